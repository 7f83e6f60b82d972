"""Wire formats of the sidecar: its HTTP control API, its metadata record and operator commands.

HTTP (`megatron-rl sidecar`, all under /v1/, JSON; `Authorization: Bearer <token>` on all but /v1/health):

    GET  /v1/health           200 {"state"} while the sidecar runs and its engine has not failed, else 503
    GET  /v1/status           SidecarStatus
    GET  /v1/ready?timeout=S&weight_version=V   SidecarStatus once ready (at V) within S ≤ 60 s, else 503
                              SidecarTimeout (ask again) or SidecarFailed (give up)
    POST /v1/weights          LoadWeightsBody  → SidecarStatus
    POST /v1/weights/pushed   WeightsPushedBody → SidecarStatus
    POST /v1/memory/release   MemoryTagsBody   → SidecarStatus
    POST /v1/memory/resume    MemoryTagsBody   → SidecarStatus
    POST /v1/engine/restart   (no body)        → SidecarStatus
    POST /v1/engine/stop      (no body)        → SidecarStatus
    POST /v1/engine/start     (no body)        → SidecarStatus
    GET  /v1/weight-files/<directory>/<file>   the bytes of one file of a weight version in the sidecar's
                              shared memory (<directory> below its hybrid.shm_dir, as in WeightSource), for
                              other pods' sidecars to fetch (hybrid/weight_delivery.py)

Errors are `{"error": {"message", "type"}}`, `type` naming the `SidecarError` class below, with its
HTTP status (400 bad request, 401 no or wrong token, 404 no such weight file, 409 not allowed in the
current state, 503 the engine cannot serve it). The client raises the same classes, so in-process and
HTTP callers handle errors alike.

Metadata store (when the sidecar has one), under `run_prefix(run_name)`:

    sidecars/<pod_name>          SidecarStatus as JSON, put with a lease of hybrid.sidecar_lease_ttl_s kept alive
                                 by the sidecar, re-put on every change: it vanishes that long after the sidecar dies
    commands/sidecar             SidecarCommand for every sidecar of the run
    commands/sidecar/<pod_name>  SidecarCommand for one sidecar

A sidecar runs each command put there while it runs (earlier ones are not replayed), at most once per
`id`, and acknowledges it in its record's `last_command`.
"""
from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.control.store import run_prefix
from megatron_rl.errors import UserError
from megatron_rl.rollout.protocol import MemoryTag

if TYPE_CHECKING:
    from megatron_rl.config import HybridConfig

SIDECAR_TOKEN_ENV = "MEGATRON_RL_SIDECAR_TOKEN"

SidecarState = Literal["starting", "ready", "restarting", "stopped", "failed"]
SidecarCommandOp = Literal["stop_engine", "start_engine", "restart_engine", "release_memory", "resume_memory"]
EngineKind = Literal["embedded", "sglang"]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# --------------------------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightSource(_Body):
    """Files of a weight version that another pod's sidecar serves (GET /v1/weight-files/...)."""

    sidecar_url: str = Field(min_length=1, description="the serving sidecar's control API, as this pod reaches it")
    directory: str = Field(min_length=1, description="the version's directory below the serving sidecar's shm_dir")
    files: dict[str, int] = Field(min_length=1, description="file name → bytes")


class LoadWeightsBody(_Body):
    """Load the HF safetensors directory `path` (readable by the engine) and serve it as `weight_version`,
    first fetching into it the files `sources` name (what this node's copy lacks). On success the sidecar
    owns the directory: it keeps it to re-load after an engine restart, and deletes it once a newer
    version has loaded."""

    path: str = Field(min_length=1)
    weight_version: str = Field(min_length=1)
    sources: list[WeightSource] = []


class WeightsPushedBody(_Body):
    """The trainer pushed `weight_version` into the engine itself (CUDA IPC or NCCL): the sidecar checks the
    engine reports it and records it. Nothing is on disk, so an engine restart cannot re-load it."""

    weight_version: str = Field(min_length=1)


class MemoryTagsBody(_Body):
    """Tags to release or resume; null: release all, resume every released one."""

    tags: list[MemoryTag] | None = None


class SidecarCommand(_Body):
    """An operator's command, put as JSON at a `commands/sidecar...` key."""

    id: str = Field(min_length=1, description="unique per command; a sidecar runs each id once")
    op: SidecarCommandOp
    tags: list[MemoryTag] | None = Field(None, description="release_memory / resume_memory only")


class CommandResult(BaseModel):
    """The acknowledgement of a command in the sidecar's record."""

    id: str
    op: str  # as given, so that an invalid command can be acknowledged too
    ok: bool
    message: str
    finished_at: datetime.datetime


class SidecarStatus(BaseModel):
    """What a sidecar reports (GET /v1/status, its metadata record).

    `weight_version` is the version the sidecar holds (None until the first load): the engine serves it
    whenever `state` is ready. `restarts` counts restarts after a crash or a failed start; past
    hybrid.max_engine_restarts the state is failed and `last_error` ends with the engine's log.
    """

    pod_name: str
    engine: EngineKind
    state: SidecarState
    engine_url: str
    engine_pid: int | None = None
    weight_version: str | None = None
    restarts: int = 0
    released_tags: list[MemoryTag] = []
    last_error: str | None = None
    last_command: CommandResult | None = None
    updated_at: datetime.datetime
    # Where weight files reach this sidecar's engine (disk path): its host and hybrid.shm_dir, and the URL
    # other pods fetch its copies at (None: it serves none, an in-process sidecar).
    host: str | None = None
    shm_dir: str | None = None
    control_url: str | None = None


class HealthBody(BaseModel):
    state: SidecarState


# --------------------------------------------------------------------------------------------- errors


class SidecarError(RuntimeError):
    """A sidecar operation failed; `http_status` is how the HTTP API reports it."""

    http_status = 500


class SidecarRequestError(SidecarError):
    """Bad input: the message names the field (a missing weights directory, an unknown memory tag)."""

    http_status = 400


class SidecarAuthError(SidecarError):
    http_status = 401


class SidecarNotFound(SidecarError):
    """No such weight file in the sidecar's shared memory."""

    http_status = 404


class SidecarStateError(SidecarError):
    """Not allowed in the current state (e.g. resuming a tag that is not released, loading into released weights)."""

    http_status = 409


class SidecarUnavailable(SidecarError):
    """The engine cannot do it now (it crashed and is restarting, or did not answer)."""

    http_status = 503


class SidecarFailed(SidecarUnavailable):
    """The engine crashed more than hybrid.max_engine_restarts times; the message ends with its log."""


class SidecarUnreachable(SidecarUnavailable):
    """No HTTP connection to the sidecar could be made."""


class SidecarTimeout(SidecarUnavailable, TimeoutError):
    """`wait_ready` ran out of time; the message says the state it was left in."""


ERROR_TYPES: dict[str, type[SidecarError]] = {cls.__name__: cls for cls in (
    SidecarError, SidecarRequestError, SidecarAuthError, SidecarNotFound, SidecarStateError, SidecarUnavailable,
    SidecarFailed, SidecarUnreachable, SidecarTimeout)}


# --------------------------------------------------------------------------------------------- keys and token


def check_pod_name(pod_name: str) -> str:
    if not pod_name or "/" in pod_name or pod_name.strip() != pod_name:
        raise UserError(f"hybrid.pod_name={pod_name!r} is not a valid pod name: use a non-empty name without '/' "
                        "or surrounding spaces (in Kubernetes: the pod's metadata.name)")
    return pod_name


def sidecar_record_key(run_name: str, pod_name: str) -> str:
    return f"{run_prefix(run_name)}sidecars/{check_pod_name(pod_name)}"


def sidecar_command_keys(run_name: str, pod_name: str) -> tuple[str, str]:
    """(the key for every sidecar of the run, the key for this pod's only)."""
    every = f"{run_prefix(run_name)}commands/sidecar"
    return every, f"{every}/{check_pod_name(pod_name)}"


def load_sidecar_token(hybrid: HybridConfig) -> str | None:
    """The control API's bearer token: the contents of hybrid.sidecar_token_file, else env
    MEGATRON_RL_SIDECAR_TOKEN; None when neither is set."""
    if hybrid.sidecar_token_file:
        try:
            token = open(hybrid.sidecar_token_file, encoding="utf-8").read().strip()
        except OSError as error:
            raise UserError(f"hybrid.sidecar_token_file={hybrid.sidecar_token_file}: cannot read it "
                            f"({error.strerror}); point it at a file holding the sidecar's token") from None
        if not token:
            raise UserError(f"hybrid.sidecar_token_file={hybrid.sidecar_token_file} is empty; write a token into it "
                            "(e.g. `openssl rand -hex 32`)")
        return token
    return os.environ.get(SIDECAR_TOKEN_ENV, "").strip() or None
