"""A real kube-apiserver for the integration tier of the Kubernetes tests: loopback only, backed by the test
etcd, static-token authentication and RBAC authorization, stopped by its PID.

No registry ships the binary; `make kube-apiserver` builds v1.20.2 from Debian's source package and caches
it (deploy/tools/build_kube_apiserver.sh, about 8 minutes once). Tests that need it skip, saying so, when
it has not been built; the kmock tests in the same files cover the same client code in every run.
"""
from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from megatron_rl.net import free_port

BINARY = Path(os.environ.get("KUBE_APISERVER") or
              Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-rl" / "kube-apiserver"
              / "v1.20.2" / "kube-apiserver")
BUILD_HINT = "no kube-apiserver binary is cached: `make kube-apiserver` builds one (about 8 minutes, once)"

ADMIN_TOKEN = "admin-token"


class KubeApiServer:
    """kube-apiserver on 127.0.0.1. `tokens` maps bearer token → (user, groups); the admin token is added."""

    def __init__(self, etcd_endpoint: str, work_dir: Path, tokens: dict[str, tuple[str, list[str]]]):
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        lines = [f'{ADMIN_TOKEN},admin,admin,"system:masters"']
        lines += [f'{token},{user},{user},"{",".join(groups)}"' for token, (user, groups) in tokens.items()]
        (work_dir / "tokens.csv").write_text("\n".join(lines) + "\n")
        key = work_dir / "service-accounts.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(work_dir / "service-accounts.pub")],
                       check=True, capture_output=True)
        self.command = [
            str(BINARY), f"--etcd-servers={etcd_endpoint}", f"--etcd-prefix=/registry-{uuid.uuid4().hex[:8]}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            "--insecure-port=0", f"--cert-dir={work_dir / 'certs'}",
            f"--token-auth-file={work_dir / 'tokens.csv'}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={work_dir / 'service-accounts.pub'}",
            f"--service-account-signing-key-file={key}",
            # Only a configuration value: nothing is routed there.
            "--service-cluster-ip-range=10.96.0.0/24",
        ]
        self.log_path = work_dir / "kube-apiserver.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # its certificate is made at start; clients below verify it
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
        request = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with opener.open(request, timeout=2) as response:
                    if response.read() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kube-apiserver not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def certificate(self) -> Path:
        """The self-signed serving certificate kube-apiserver wrote at start (for 127.0.0.1)."""
        return self.work_dir / "certs" / "apiserver.crt"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def api_client(self, token: str = ADMIN_TOKEN):
        import kubernetes

        configuration = kubernetes.client.Configuration(host=self.url)
        configuration.ssl_ca_cert = str(self.certificate)
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(configuration)

    def kubeconfig(self, token: str) -> dict:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": self.url, "certificate-authority": str(self.certificate)}}],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "operator"}}],
        }


def start_kube_apiserver(etcd_endpoint: str, work_dir: Path, tokens: dict[str, tuple[str, list[str]]]) -> KubeApiServer:
    """A started server, or a skip naming how to build the binary."""
    if not BINARY.is_file():
        pytest.skip(BUILD_HINT)
    server = KubeApiServer(etcd_endpoint, work_dir, tokens)
    server.start()
    return server
