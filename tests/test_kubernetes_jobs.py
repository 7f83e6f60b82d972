"""Suspending and resuming a run's Kubernetes Job through the real `kubernetes` client, in two tiers named in each
test: kmock's in-memory API-server emulator (every run; it checks no schemas, authorizes nothing and runs no
controllers), and a real kube-apiserver with RBAC (v1.20.2, the newest Debian builds; its tests skip, saying
so, until `make kube-apiserver` has built and cached it).

kmock serves in the test's event loop, so the synchronous client and CLI run in worker threads there.
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

from etcd_server import etcd_server  # noqa: F401  (fixture)
from kube_apiserver import start_kube_apiserver
from megatron_rl.cli import main
from megatron_rl.control.kubernetes import JobControl
from megatron_rl.control.operations import RunControl
from megatron_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy" / "tools"))
from render_chart import documents, render  # noqa: E402

TINY = str(REPO / "megatron_rl" / "examples" / "tiny.yaml")
JOB = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "run-a", "namespace": "rl"},
    "spec": {"suspend": False, "template": {"spec": {"restartPolicy": "Never",
                                                      "containers": [{"name": "trainer", "image": "megatron-rl"}]}}},
}


def start_tiny_run(run_dir: Path) -> tuple[subprocess.Popen, RunControl]:
    """A live trainer (the pod's) on the tiny config, once it has finished an iteration."""
    trainer = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", "--config", TINY, "--run-dir",
                                str(run_dir), "--iterations", "6", "data.prompts_per_iteration=8", "eval.interval=0",
                                "train.optimizer_steps_per_iteration=2"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    control = RunControl(run_dir, "megatron-rl")
    deadline = time.monotonic() + 180
    while (status := control.status()) is None or status.iteration < 1:
        if time.monotonic() > deadline or trainer.poll() is not None:
            trainer.kill()
            raise AssertionError(f"the tiny run did not finish an iteration (trainer exit code {trainer.poll()})")
        time.sleep(0.2)
    return trainer, control


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
    trainer, control = await asyncio.to_thread(start_tiny_run, run_dir)
    try:
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


# The real kube-apiserver tier. Tokens stand in for the credentials a pod and an operator would have: the chart's
# ServiceAccount (what RBAC sees when the pod's own token is used) and a user the chart grants nothing.
SERVICE_ACCOUNT_TOKEN = "run-service-account-token"
STRANGER_TOKEN = "stranger-token"


@pytest.fixture(scope="module")
def kube_apiserver(etcd_server, tmp_path_factory):  # noqa: F811
    server = start_kube_apiserver(etcd_server.endpoint, tmp_path_factory.mktemp("kube-apiserver"), {
        SERVICE_ACCOUNT_TOKEN: ("system:serviceaccount:rl:megatron-rl",
                                ["system:serviceaccounts", "system:serviceaccounts:rl", "system:authenticated"]),
        STRANGER_TOKEN: ("stranger", ["system:authenticated"]),
    })
    yield server
    server.stop()


def chart_manifests(*kinds: str) -> list[dict]:
    return [manifest for _path, document in documents(render(namespace="rl"))
            if (manifest := yaml.safe_load(document))["kind"] in kinds]


@pytest.fixture(scope="module")
def installed_chart(kube_apiserver):
    """The chart's ServiceAccount and RBAC in namespace rl, with a run's Job under the chart's name and another
    run's Job beside it. The chart's own Job needs 1.29 (its kubeVersion), so a plain one stands in for it."""
    admin = kube_apiserver.api_client()
    kubernetes.client.CoreV1Api(admin).create_namespace({"metadata": {"name": "rl"}})
    for manifest in chart_manifests("ServiceAccount", "Role", "RoleBinding"):
        kubernetes.utils.create_from_dict(admin, manifest, namespace="rl")
    batch = kubernetes.client.BatchV1Api(admin)
    for name in ("megatron-rl", "other-run"):
        batch.create_namespaced_job("rl", {**JOB, "metadata": {"name": name}})
    return admin


def test_kube_apiserver_1_20_refuses_the_charts_job_as_its_kube_version_says(kube_apiserver, installed_chart):
    (job,) = chart_manifests("Job")
    with pytest.raises(kubernetes.utils.FailToCreateError, match="must not be set for init containers"):
        kubernetes.utils.create_from_dict(installed_chart, job, namespace="rl")  # native sidecars: 1.29+
    chart = yaml.safe_load((REPO / "deploy" / "helm" / "megatron-rl" / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.29.0-0"


def test_the_charts_service_account_reads_its_job_but_kube_apiserver_1_20_cannot_suspend_it(kube_apiserver,
                                                                                             installed_chart):
    jobs = JobControl("rl", kube_apiserver.api_client(SERVICE_ACCOUNT_TOKEN))
    # RBAC lets the read through; the 1.20 server dropped the chart's spec.suspend, which pause must not ignore.
    with pytest.raises(UserError, match=r"API server does not support spec.suspend on job rl/megatron-rl: suspending "
                                        r"Jobs needs Kubernetes >= 1.22"):
        jobs.suspended("megatron-rl")
    with pytest.raises(UserError, match="does not support spec.suspend"):
        jobs.set_suspended("megatron-rl", True)
    job = kubernetes.client.BatchV1Api(installed_chart).read_namespaced_job("megatron-rl", "rl")
    assert job.spec.suspend is None  # JOB asked for false: the server dropped the field it does not know


def test_the_charts_role_confines_its_service_account_to_its_own_job_on_kube_apiserver_1_20(kube_apiserver,
                                                                                            installed_chart):
    with pytest.raises(UserError, match=r"not allowed to patch job rl/other-run \(HTTP 403\): the credentials need get "
                                        r"and patch on jobs there"):
        JobControl("rl", kube_apiserver.api_client(SERVICE_ACCOUNT_TOKEN)).set_suspended("other-run", True)
    with pytest.raises(UserError, match=r"not allowed to read job rl/megatron-rl \(HTTP 403\)"):
        JobControl("rl", kube_apiserver.api_client(STRANGER_TOKEN)).suspended("megatron-rl")
    with pytest.raises(UserError, match="job rl/nope not found; pass the run's Job with --job and --namespace"):
        JobControl("rl", installed_chart).suspended("nope")


def test_runs_pause_with_kubernetes_on_kube_apiserver_1_20_refuses_before_the_run_is_asked(kube_apiserver,
                                                                                           installed_chart, tmp_path,
                                                                                           monkeypatch, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kube_apiserver.kubeconfig(SERVICE_ACCOUNT_TOKEN)))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    trainer, control = start_tiny_run(tmp_path / "run")
    try:
        code = main(["runs", "pause", str(tmp_path / "run"), "--kubernetes", "--namespace", "rl", "--job", "megatron-rl"])
        assert code == 2 and "does not support spec.suspend on job rl/megatron-rl" in capsys.readouterr().err
        # The run was not asked to pause: it goes on, and its pods would have kept their GPUs with nobody told.
        assert control.pending_operation() is None and control.status().state == "running" and trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait()
