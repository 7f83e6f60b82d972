"""A local etcd server process: 127.0.0.1 only, free ports, a given data directory.

For the one-machine pod layout (`megatron-rl local-pod`) and the tests. etcd comes from Debian's
`etcd-server` package (`apt-get install -y etcd-server`).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.net import free_port

INSTALL_HINT = (
    "etcd is not installed (no `etcd` on PATH). Install it with `apt-get update && apt-get install -y "
    "etcd-server` (Debian 12, as root, etcd-server alone on its apt line)"
)


class EtcdProcess:
    """One etcd member on loopback. Ports are chosen at the first `start()` and kept for restarts."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.binary = shutil.which("etcd")
        if self.binary is None:
            raise UserError(INSTALL_HINT)
        self.data_dir = data_dir
        self.log_path = log_path
        self.client_port: int | None = None
        self.peer_port: int | None = None
        self.process: subprocess.Popen | None = None
        # Health checks go straight to loopback, never through an environment proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _command(self) -> list[str]:
        client_url = self.endpoint
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary, "--name", "test", "--data-dir", str(self.data_dir), "--logger", "zap",
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            # etcd's minimum lease TTL is 1.5 election timeouts rounded up; these settings make it 1 s so
            # short leases work (defaults give 2 s). A single member has no peers to miss heartbeats.
            "--heartbeat-interval", "50", "--election-timeout", "500",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it reports healthy. A first start retries on port collisions."""
        first_start = self.client_port is None
        for _attempt in range(3 if first_start else 1):
            if first_start:
                self.client_port, self.peer_port = free_port(), free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_healthy(timeout):
                return
            self.stop()
            if not first_start:
                break
        raise RuntimeError(f"etcd did not become healthy at {self.endpoint}; log tail:\n{self.log_tail()}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited, e.g. a port taken between choosing and binding it
            try:
                with self._opener.open(self.endpoint + "/health", timeout=2) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM (a clean shutdown that keeps the data), SIGKILL if it has not exited within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace") if self.log_path.exists() else ""
