"""`SidecarClient`: the sidecar's control API over HTTP, as a `SidecarControl` (see sidecar.py).

Standard library only (urllib), thread-safe (a connection per call), environment proxies ignored (the
sidecar is pod-local). Errors come back as the `SidecarError` classes the sidecar raised, rebuilt from
the error body's `type`; a sidecar that cannot be reached raises `SidecarUnreachable`.
"""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pydantic import BaseModel, ValidationError

from megatron_rl.errors import UserError
from megatron_rl.hybrid.sidecar_protocol import (
    ERROR_TYPES, LoadWeightsBody, MemoryTagsBody, SidecarError, SidecarFailed, SidecarRequestError, SidecarStatus,
    SidecarTimeout, SidecarUnavailable, SidecarUnreachable, WeightSource, WeightsPushedBody, load_sidecar_token,
)
from megatron_rl.rollout.protocol import describe_validation_error

if TYPE_CHECKING:
    from megatron_rl.config import HybridConfig

__all__ = ["SidecarClient"]

READY_ROUND_S = 10.0  # one GET /v1/ready waits at most this long on the sidecar
_TYPE_BY_STATUS = {400: "SidecarRequestError", 401: "SidecarAuthError", 404: "SidecarNotFound",
                   409: "SidecarStateError", 503: "SidecarUnavailable"}


class SidecarClient:
    """Client of one sidecar. `timeout` (s) bounds each call (a restart or a load may take minutes)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0, poll_interval: float = 0.2):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._token = token
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_config(cls, hybrid: HybridConfig, timeout: float = 600.0) -> SidecarClient:
        if not hybrid.sidecar_url:
            raise UserError("hybrid.sidecar_url is not set; point it at the pod's `megatron-rl sidecar`")
        return cls(hybrid.sidecar_url, load_sidecar_token(hybrid), timeout)

    def __repr__(self) -> str:
        return f"SidecarClient({self.base_url!r})"

    def _exchange(self, method: str, path: str, body: BaseModel | None, timeout: float | None,
                  consume: Callable[[http.client.HTTPResponse], Any]) -> Any:
        """Send the request and hand the response to `consume`; every failure as a SidecarError."""
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = body.model_dump_json().encode()
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        limit = self.timeout if timeout is None else timeout
        try:
            with self._opener.open(request, timeout=limit) as response:
                return consume(response)
        except urllib.error.HTTPError as error:
            raise _error_from_response(method, url, error.code, error.read()) from None
        except urllib.error.URLError as error:
            raise SidecarUnreachable(f"cannot reach the sidecar at {self.base_url}: {error.reason}; is "
                                     f"`megatron-rl sidecar` running there? ({method} {path})") from None
        except (TimeoutError, socket.timeout):
            raise SidecarUnavailable(f"{method} {url} timed out after {limit:g} s") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise SidecarUnreachable(f"{method} {url}: connection lost ({type(error).__name__}: {error})") from None

    def _call(self, method: str, path: str, body: BaseModel | None = None, timeout: float | None = None) -> Any:
        try:
            return self._exchange(method, path, body, timeout, lambda response: json.loads(response.read()))
        except ValueError:
            raise SidecarError(f"{method} {self.base_url + path}: the response is not JSON") from None

    def download(self, path: str, destination: Path) -> None:
        """GET `path` into the file `destination`, streamed (a weight shard may be GBs)."""
        with open(destination, "wb") as file:
            self._exchange("GET", path, None, None, lambda response: shutil.copyfileobj(response, file, 2**22))

    def _status(self, method: str, path: str, body: BaseModel | None = None,
                timeout: float | None = None) -> SidecarStatus:
        payload = self._call(method, path, body, timeout)
        try:
            return SidecarStatus.model_validate(payload)
        except ValidationError as error:
            raise SidecarError(f"{method} {self.base_url + path}: unexpected response: {error.errors()[0]['loc']}: "
                               f"{error.errors()[0]['msg']}") from None

    def status(self) -> SidecarStatus:
        return self._status("GET", "/v1/status")

    def wait_ready(self, timeout: float, weight_version: str | None = None) -> SidecarStatus:
        """Wait on the sidecar (GET /v1/ready, in rounds of at most `READY_ROUND_S`); an unreachable sidecar is
        asked again until the deadline (it may be restarting)."""
        deadline = time.monotonic() + timeout
        query = {"weight_version": weight_version} if weight_version is not None else {}
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            path = "/v1/ready?" + urllib.parse.urlencode({"timeout": min(remaining, READY_ROUND_S), **query})
            try:
                return self._status("GET", path, timeout=min(remaining, READY_ROUND_S) + 30.0)
            except SidecarFailed:
                raise
            except SidecarUnavailable as error:  # not ready in this round, or unreachable
                last = error
            if time.monotonic() >= deadline:
                wanted = f" at weight version {weight_version!r}" if weight_version is not None else ""
                raise SidecarTimeout(f"the sidecar at {self.base_url} was not ready{wanted} after {timeout:g} s: "
                                     f"{last}") from None
            if isinstance(last, SidecarUnreachable):
                time.sleep(self.poll_interval)

    def load_weights(self, path: str, weight_version: str, sources: Sequence[WeightSource] = ()) -> SidecarStatus:
        body = _body(LoadWeightsBody, path=str(path), weight_version=weight_version, sources=list(sources))
        return self._status("POST", "/v1/weights", body)

    def weights_pushed(self, weight_version: str) -> SidecarStatus:
        return self._status("POST", "/v1/weights/pushed", _body(WeightsPushedBody, weight_version=weight_version))

    def release_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        return self._status("POST", "/v1/memory/release", _body(MemoryTagsBody, tags=tags))

    def resume_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        return self._status("POST", "/v1/memory/resume", _body(MemoryTagsBody, tags=tags))

    def restart_engine(self) -> SidecarStatus:
        return self._status("POST", "/v1/engine/restart")

    def stop_engine(self) -> SidecarStatus:
        return self._status("POST", "/v1/engine/stop")

    def start_engine(self) -> SidecarStatus:
        return self._status("POST", "/v1/engine/start")

    def close(self) -> None:
        """Nothing to release (a connection per call); the sidecar keeps running."""


def _body(model: type[BaseModel], **fields) -> BaseModel:
    """A request body, invalid input raising what the sidecar would answer (SidecarRequestError)."""
    try:
        return model(**fields)
    except ValidationError as error:
        raise SidecarRequestError(describe_validation_error(error)) from None


def _error_from_response(method: str, url: str, status: int, raw: bytes) -> SidecarError:
    message, kind = raw.decode("utf-8", errors="replace").strip() or "(empty body)", None
    try:
        error = json.loads(raw)["error"]
        message, kind = error["message"], error.get("type")
    except (ValueError, KeyError, TypeError):
        pass
    cls = ERROR_TYPES.get(kind or _TYPE_BY_STATUS.get(status, "SidecarError"), SidecarError)
    return cls(f"{method} {url}: HTTP {status}: {message}")
