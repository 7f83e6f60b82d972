"""Suspending and resuming a run's Kubernetes Job — the real `kubernetes` client against kmock's in-memory
API-server emulator (not a real kube-apiserver: it checks no schemas and runs no controllers).

kmock serves in the test's event loop, so the synchronous client and CLI run in worker threads.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import kubernetes
import pytest
import yaml

from megatron_rl.cli import main
from megatron_rl.control.kubernetes import JobControl
from megatron_rl.control.operations import RunControl
from megatron_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "megatron_rl" / "examples" / "tiny.yaml")
JOB = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "run-a", "namespace": "rl"},
    "spec": {"suspend": False, "template": {"spec": {"restartPolicy": "Never",
                                                      "containers": [{"name": "trainer", "image": "megatron-rl"}]}}},
}


@pytest.fixture
def api_client(kmock):
    return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=str(kmock.url)))


async def create_job(api_client) -> None:
    await asyncio.to_thread(kubernetes.client.BatchV1Api(api_client).create_namespaced_job, "rl", JOB)


def suspend_field(kmock) -> bool:
    return kmock.objects["batch/v1/jobs", "rl", "run-a"]["spec"]["suspend"]


@pytest.mark.asyncio
async def test_the_kubernetes_client_suspends_and_resumes_a_job_in_kmock(kmock, api_client):
    await create_job(api_client)
    jobs = JobControl("rl", api_client)
    assert await asyncio.to_thread(jobs.suspended, "run-a") is False
    await asyncio.to_thread(jobs.set_suspended, "run-a", True)
    assert suspend_field(kmock) is True and await asyncio.to_thread(jobs.suspended, "run-a") is True
    await asyncio.to_thread(jobs.set_suspended, "run-a", False)
    assert suspend_field(kmock) is False


@pytest.mark.asyncio
async def test_a_missing_job_is_a_clear_error_in_kmock(kmock, api_client):
    with pytest.raises(UserError, match="job rl/nope not found; pass the run's Job with --job and --namespace"):
        await asyncio.to_thread(JobControl("rl", api_client).set_suspended, "nope", True)


@pytest.mark.asyncio
async def test_runs_pause_and_resume_with_kubernetes_drive_a_live_run_and_its_job_in_kmock(kmock, api_client, tmp_path,
                                                                                          monkeypatch):
    await create_job(api_client)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url)}}],
        "users": [{"name": "operator", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", "--config", TINY, "--run-dir",
                                str(run_dir), "--iterations", "6", "data.prompts_per_iteration=8", "eval.interval=0",
                                "train.optimizer_steps_per_iteration=2"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        control = RunControl(run_dir, "megatron-rl")
        deadline = time.monotonic() + 180
        while (status := control.status()) is None or status.iteration < 1:
            assert time.monotonic() < deadline and trainer.poll() is None
            await asyncio.sleep(0.2)
        # The operator pauses the run and its Job: the Job is suspended only once the run reports paused.
        code = await asyncio.to_thread(main, ["runs", "pause", str(run_dir), "--kubernetes", "--namespace", "rl",
                                              "--job", "run-a"])
        assert code == 0
        assert control.status().state == "paused" and suspend_field(kmock) is True
        assert await asyncio.to_thread(trainer.wait, 60) == 0  # the pod's trainer exits on pause
        code = await asyncio.to_thread(main, ["runs", "resume", str(run_dir), "--kubernetes", "--namespace", "rl",
                                              "--job", "run-a"])
        assert code == 0 and suspend_field(kmock) is False  # its pods come back and --auto-resume continues
    finally:
        trainer.kill()
        trainer.wait()
