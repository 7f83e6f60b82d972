"""Code-execution sandbox: untrusted programs run in pre-warmed bubblewrap sandboxes with seccomp,
cgroup and rlimit limits, in process (`SandboxPool`) or over HTTP (`megatron-rl sandbox serve`,
`SandboxClient`). Layers and requirements: `isolation.py`; the per-run process model: `zygote.py`."""

from megatron_rl.reward.sandbox.client import SandboxClient
from megatron_rl.reward.sandbox.isolation import Isolation, detect
from megatron_rl.reward.sandbox.pool import Sandbox, SandboxPool
from megatron_rl.reward.sandbox.protocol import (
    Capabilities, RunRequest, RunResult, SandboxError, SandboxUnreachable,
)

__all__ = [
    "Capabilities",
    "Isolation",
    "RunRequest",
    "RunResult",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "SandboxPool",
    "SandboxUnreachable",
    "detect",
]
