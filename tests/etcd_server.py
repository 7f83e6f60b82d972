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
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_rl.control.etcd_process import INSTALL_HINT, EtcdProcess


def _thread_state(task: Path) -> str | None:
    """The state letter of one thread from /proc/PID/task/TID/stat, None if it has exited."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]  # the command name in parentheses may contain spaces


class EtcdServer(EtcdProcess):
    """The package's etcd process plus what outage tests need: freeze, thaw and compaction."""

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
