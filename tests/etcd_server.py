"""A real etcd server for tests: 127.0.0.1 only, free ports, a temporary data dir, stopped by its PID.

Use the session fixture in a test module with `from etcd_server import etcd_server`; the server
object has `.endpoint` ("http://127.0.0.1:PORT"), `stop()` / `start()` for outage tests (data and
ports are kept across a restart), `freeze()` / `thaw()` for a hung server and `compact()`.
`CuttableProxy` puts a link between one client and etcd that a test can cut (a network partition).
etcd comes from Debian's `etcd-server` package; without it the fixture fails (never skips) with the
command that installs it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_rl.net import free_port

INSTALL_HINT = (
    "etcd is not installed (no `etcd` on PATH); the etcd store tests need a real server. Install it with "
    "`apt-get update && apt-get install -y etcd-server` (Debian 12, as root, etcd-server alone on its apt line)"
)


def _thread_state(task: Path) -> str | None:
    """The state letter of one thread from /proc/PID/task/TID/stat, None if it has exited."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]  # the command name in parentheses may contain spaces


class EtcdServer:
    """One etcd member on loopback. Ports are chosen at the first `start()` and kept for restarts."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.binary = shutil.which("etcd")
        if self.binary is None:
            raise FileNotFoundError(INSTALL_HINT)
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
            # lease tests can use TTL 1 (defaults give 2 s). A single member has no peers to miss heartbeats.
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

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, like a hung etcd. Returns once every
        thread is stopped (the signal is delivered asynchronously)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [_thread_state(task) for task in tasks.iterdir()]
            if all(state in ("T", "t", None) for state in states):
                return
            time.sleep(0.01)
        raise RuntimeError(f"etcd (PID {self.process.pid}) did not stop after SIGSTOP")

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (through its JSON gateway); that revision."""
        header = self._post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]
        revision = int(header["revision"])
        self._post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace") if self.log_path.exists() else ""


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 to `target_port` whose link can be cut (every connection dropped,
    new ones closed at once) and restored: a network partition between one client and etcd."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._linked = True
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="cuttable-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _address = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if not self._linked:
                    downstream.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self._sockets |= {downstream, upstream}
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._linked = False
            for connection in self._sockets:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._sockets.clear()

    def restore(self) -> None:
        with self._lock:
            self._linked = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """A running etcd for the whole session. Tests that stop it start it again before they end; one wipes
    its data, so tests keep their keys under a prefix of their own and rely on nothing left by others."""
    if shutil.which("etcd") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    root = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(root / "data", root / "etcd.log")
    server.start()
    yield server
    server.stop()
