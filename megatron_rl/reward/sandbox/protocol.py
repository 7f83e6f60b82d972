"""Wire formats of the sandbox service, in one place: what `POST /run`, `GET /health` and `GET /capabilities`
carry, used by the server, the client and the pool alike.

Request bodies forbid unknown keys (the server answers 400 naming the key); responses ignore unknown keys
so that an older client reads a newer server.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Language = Literal["python", "cpp"]
IsolationMode = Literal["bwrap-privileged", "bwrap-userns", "none"]

# Verdicts. A limit verdict wins over the exit status it caused (a program killed for memory is
# memory_limit, whatever signal killed it); see `RunResult.status`.
Status = Literal["ok", "runtime_error", "timeout", "memory_limit", "output_limit", "killed", "compile_error"]
STATUSES: tuple[str, ...] = Status.__args__  # type: ignore[attr-defined]

MAX_PROGRAM_BYTES = 1 << 20
MAX_STDIN_BYTES = 64 << 20
MAX_TIMEOUT_S = 300.0


class SandboxError(RuntimeError):
    """A sandbox call failed (bad request, no workers, service error); the message says which and why."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when the error came from the service


class SandboxUnreachable(SandboxError):
    """No HTTP connection could be made to the sandbox service."""


class RunRequest(BaseModel):
    """One program to run, with its input and limits."""

    model_config = ConfigDict(extra="forbid")

    program: str = Field(max_length=MAX_PROGRAM_BYTES, description="source code")
    language: Language = "python"
    stdin: str = Field("", max_length=MAX_STDIN_BYTES)
    timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="wall-clock limit")
    cpu_time_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S,
                                     description="CPU-time limit of the whole run (default: timeout_s); each "
                                                 "process is stopped at the next whole second, the total is "
                                                 "checked exactly")
    memory_mb: int = Field(512, ge=16, le=1 << 16,
                           description="memory of all the run's processes together, scratch files included; "
                                       "under a memory cgroup the sandbox's own buffers get an allowance on "
                                       "top (32 MiB + 2 × max_output_bytes + the stdin size)")
    max_processes: int = Field(32, ge=1, le=4096, description="processes and threads, the first one included")
    max_output_bytes: int = Field(8 << 20, ge=1024, le=256 << 20, description="stdout and stderr together")

    @property
    def cpu_limit_s(self) -> float:
        return self.cpu_time_s if self.cpu_time_s is not None else self.timeout_s


class RunResult(BaseModel):
    """The verdict on one run.

    status:
      ok             exited with status 0
      runtime_error  exited non-zero, or crashed on a fault signal (SIGSEGV, SIGABRT, SIGFPE, SIGBUS, SIGILL,
                     SIGTRAP, SIGSYS)
      timeout        went past timeout_s (wall clock) or cpu_time_s (CPU time)
      memory_limit   went past memory_mb (killed by the memory cgroup, or a Python MemoryError under RLIMIT_AS)
      output_limit   wrote more than max_output_bytes (it was killed; the output up to the limit is kept)
      killed         ended by any other signal (SIGKILL from itself, SIGTERM, ...) or its sandbox worker was lost
      compile_error  (cpp) the compiler failed or went past its own limits; its diagnostics are in stderr
    """

    model_config = ConfigDict(extra="ignore")

    status: Status
    message: str = Field(description="one line saying what happened, naming the limit that was hit")
    exit_code: int | None = None
    signal: str | None = Field(None, description="name of the signal that ended the program, e.g. SIGKILL")
    wall_time_s: float
    cpu_time_s: float = Field(description="user + system time of all the run's processes")
    memory_peak_mb: float | None = Field(None, description="peak memory of the run (memory cgroup only)")
    process_limit_hit: bool | None = Field(None, description="a fork failed at max_processes (pids cgroup only)")
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class Capabilities(BaseModel):
    """What isolation the service has, detected at start-up."""

    model_config = ConfigDict(extra="ignore")

    isolated: bool = Field(description="programs run inside bubblewrap namespaces")
    mode: IsolationMode
    bubblewrap: str | None = Field(description="bwrap version, or null when not found")
    seccomp: bool
    cgroup: str | None = Field(description='e.g. "v1: memory, pids", or null when cgroups cannot be written')
    memory_limit_by: Literal["cgroup", "rlimit"]
    process_limit_by: Literal["cgroup", "rlimit", "none"]
    per_worker_uid: bool = Field(description="each worker runs programs as its own unprivileged uid")
    python: str = Field(description="the interpreter that runs Python programs")
    languages: list[Language]
    notes: list[str] = Field(default_factory=list, description="layers that are missing, and why")


class Health(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["ok", "closed"]
    workers: int
    idle_workers: int
    runs: int
    worker_restarts: int
