"""One pod's layout on one machine: etcd, the sidecar (which starts the engine) and the trainer, each its own
process, wired as in Kubernetes — the trainer reaches the sidecar over its token-authenticated API and
the engine over SGLang's API, and all three meet in etcd.

`megatron-rl local-pod --config FILE --run-dir DIR [--iterations N] [--pods P] [key=value ...]` starts etcd
(unless control.etcd_endpoints names one), then the sidecar, then the trainer in the foreground, and stops
the others when the trainer ends. Logs: DIR/sidecar.log, DIR/etcd.log, the engine's in DIR/sidecar/.

With `--pods P` > 1 it lays out P pods' rollout side as on a multi-node cluster: a sidecar (and engine) per
pod, pod-1 … pod-P-1 logging to DIR/sidecar-K.log and DIR/sidecar-K/; the trainer drives pod-0's as its own
and the others as `hybrid.peer_sidecar_urls`, spreading every rollout over all P engines. As on separate
nodes, pod-1 … pod-P-1 have shared memory of their own (a directory below hybrid.shm_dir, removed at the
end), where no trainer rank writes: with hybrid.weight_sync=disk their sidecars fetch every version from
pod-0's.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from megatron_rl.config import load_config
from megatron_rl.control.etcd_process import EtcdProcess
from megatron_rl.errors import RunError, UserError
from megatron_rl.hybrid.sidecar_client import SidecarClient
from megatron_rl.hybrid.sidecar_protocol import SidecarError
from megatron_rl.net import free_port


def run_local_pod(config_path: str | None, run_dir: Path, overrides: list[str], pods: int = 1) -> int:
    config = load_config(config_path, overrides)  # fail on a bad config before anything starts
    if pods > 1 and config.hybrid.weight_sync == "cuda_ipc":
        raise UserError(f"--pods {pods}: the other pods' engines stand for other nodes, which CUDA IPC handles do "
                        "not reach; use hybrid.weight_sync=disk or nccl")
    if (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --run-dir (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        endpoints = config.control.etcd_endpoints
        if not endpoints:
            etcd = EtcdProcess(run_dir / "etcd", run_dir / "etcd.log")
            etcd.start()
            stack.callback(etcd.stop)
            endpoints = [etcd.endpoint]
        token_file = run_dir / "sidecar.token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        wiring = ["control.store=etcd", f"control.etcd_endpoints=[{','.join(endpoints)}]",
                  f"hybrid.sidecar_token_file={token_file}"]
        common = ["--config", config_path] if config_path else []
        sidecars = []  # every pod's sidecar is started before any is waited for: their engines load at once
        for index in range(pods):
            port = free_port()
            suffix = "" if index == 0 else f"-{index}"
            pod = [f"hybrid.sidecar_port={port}"]
            if index:
                shm_dir = Path(tempfile.mkdtemp(prefix=f"megatron-rl-pod-{index}-", dir=config.hybrid.shm_dir))
                stack.callback(shutil.rmtree, shm_dir, ignore_errors=True)
                pod += [f"hybrid.pod_name=pod-{index}", f"hybrid.shm_dir={shm_dir}"]
            log_path = run_dir / f"sidecar{suffix}.log"
            sidecar = _start(["sidecar", *common, "--log-dir", str(run_dir / f"sidecar{suffix}"), *overrides, *wiring,
                              *pod], log_path)
            stack.callback(_stop, sidecar)
            sidecars.append((sidecar, f"http://127.0.0.1:{port}", log_path))
        for sidecar, url, log_path in sidecars:
            _wait_for_sidecar(sidecar, url, token_file.read_text(), log_path, config.rollout.engine_start_timeout_s)
        urls = [url for _, url, _ in sidecars]
        peers = [f"hybrid.peer_sidecar_urls=[{','.join(urls[1:])}]"] if pods > 1 else []
        trainer = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", *common, "--run-dir", str(run_dir),
                                    *overrides, *wiring, f"hybrid.sidecar_url={urls[0]}", *peers])
        stack.callback(_stop, trainer)
        return trainer.wait()


def _start(arguments: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", *arguments], stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ))


def _wait_for_sidecar(process: subprocess.Popen, url: str, token: str, log_path: Path, timeout: float) -> None:
    client = SidecarClient(url, token, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RunError(f"the sidecar exited with code {process.returncode}; its log ({log_path}) ends with:\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            client.wait_ready(min(10.0, max(1.0, deadline - time.monotonic())))
            return
        except SidecarError:
            if time.monotonic() > deadline:
                raise RunError(f"the sidecar at {url} was not ready after {timeout:.0f} s; see {log_path}") from None


def _stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
