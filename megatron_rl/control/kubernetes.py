"""The run's Kubernetes Job: suspend it when the run pauses (its pods go, freeing their GPUs), resume it later.

Through the official `kubernetes` client (`pip install 'megatron-rl[deploy]'`), with the kubeconfig's or the
pod's own credentials. The Helm chart's RBAC grants exactly what this needs: get and patch on the Job.
"""
from __future__ import annotations

import os
import time

from megatron_rl.control.operations import RunControl
from megatron_rl.errors import RunError, UserError


def _client_module():
    try:
        import kubernetes
    except ImportError:
        raise UserError("--kubernetes needs the kubernetes client: pip install 'megatron-rl[deploy]'") from None
    return kubernetes


class JobControl:
    """Suspend / resume one namespace's Jobs (`spec.suspend`, Kubernetes ≥ 1.22)."""

    def __init__(self, namespace: str, api_client=None):
        kubernetes = _client_module()
        if api_client is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                try:  # KUBECONFIG as it is now: the client reads its default location once, at import
                    kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
                except (kubernetes.config.ConfigException, OSError) as error:
                    raise UserError(f"no Kubernetes credentials ({error}); run inside the cluster or set KUBECONFIG") from None
        self.namespace = namespace
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self._api_exception = kubernetes.client.exceptions.ApiException

    def _call(self, what: str, job: str, call):
        try:
            return call()
        except self._api_exception as error:
            if error.status == 404:
                raise UserError(f"job {self.namespace}/{job} not found; pass the run's Job with --job and --namespace") from None
            if error.status == 403:
                raise UserError(f"not allowed to {what} job {self.namespace}/{job} (HTTP 403): the credentials need "
                                "get and patch on jobs there (the Helm chart's Role grants them)") from None
            raise RunError(f"could not {what} job {self.namespace}/{job}: HTTP {error.status} {error.reason}") from None

    def _suspend_field(self, found, job: str) -> bool:
        # Servers that know the field default it to false; an older one (or 1.21 without its feature gate)
        # drops it without an error, and the Job would keep its pods and GPUs.
        if found.spec.suspend is None:
            raise UserError(f"the API server does not support spec.suspend on job {self.namespace}/{job}: suspending "
                            "Jobs needs Kubernetes >= 1.22 (1.21 with the SuspendJob feature gate); pause without "
                            "--kubernetes, then delete the Job to free its GPUs and reinstall the chart to resume")
        return found.spec.suspend

    def suspended(self, job: str) -> bool:
        return self._suspend_field(self._call("read", job, lambda: self.batch.read_namespaced_job(job, self.namespace)), job)

    def set_suspended(self, job: str, suspended: bool) -> None:
        self._suspend_field(self._call("patch", job, lambda: self.batch.patch_namespaced_job(
            job, self.namespace, {"spec": {"suspend": suspended}})), job)

    def wait_for_state_then_suspend(self, job: str, control: RunControl, want: tuple[str, ...],
                                    timeout: float = 3600.0, poll: float = 2.0) -> None:
        """Suspend `job` once the run reports one of `want` (its checkpoint is then complete): suspending
        sooner would delete the pods before they save it. Call `suspended(job)` before requesting the pause: it
        fails at once if the Job is missing, not ours to touch, or cannot be suspended on this cluster."""
        deadline = time.monotonic() + timeout
        while True:
            status = control.status()
            if status is not None and status.state in want:
                self.set_suspended(job, True)
                return
            if status is not None and status.state == "failed":
                raise RunError(f"run {control.run_name} failed before it paused ({status.message}); job "
                               f"{self.namespace}/{job} left as it is")
            if time.monotonic() > deadline:
                raise RunError(f"run {control.run_name} did not pause within {timeout:.0f} s; job "
                               f"{self.namespace}/{job} left running")
            time.sleep(poll)
