"""`SandboxClient`: HTTP client of the sandbox service (`megatron-rl sandbox serve`).

Standard library only (http.client). Thread-safe: each thread keeps its own keep-alive connection, so
many threads can run programs at once (as many run as the service has workers; the rest wait there).
`run` has the same signature as `SandboxPool.run`, so code rewards take either.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from typing import Any

from pydantic import BaseModel, ValidationError

from megatron_rl.reward.sandbox.protocol import (
    Capabilities, Health, RunRequest, RunResult, SandboxError, SandboxUnreachable,
)

__all__ = ["SandboxClient", "SandboxError", "SandboxUnreachable"]


class SandboxClient:
    """Client of one sandbox service. `timeout` (s) bounds each call beyond the run's own timeout_s."""

    def __init__(self, base_url: str, timeout: float = 60.0):
        if "://" not in base_url:
            base_url = "http://" + base_url
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"sandbox URL {base_url!r}: expected http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self._host, self._port = parsed.hostname, parsed.port or 80
        self.timeout = timeout
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SandboxClient({self.base_url!r})"

    def run(self, request: RunRequest) -> RunResult:
        return self._parse(RunResult, self._call("POST", "/run", request, timeout=request.timeout_s + self.timeout),
                           "/run")

    def health(self) -> Health:
        return self._parse(Health, self._call("GET", "/health", ok=(503,)), "/health")

    def capabilities(self) -> Capabilities:
        return self._parse(Capabilities, self._call("GET", "/capabilities"), "/capabilities")

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _call(self, method: str, path: str, body: BaseModel | None = None, *, timeout: float | None = None,
              ok: tuple[int, ...] = ()) -> Any:
        data = body.model_dump_json(exclude_none=True).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = self.base_url + path
        # One retry, for a kept-alive connection that the server closed while idle.
        for attempt in range(2):
            connection = self._connection(timeout or self.timeout)
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                raw = response.read()
                break
            except ConnectionRefusedError as error:
                self.close()
                raise SandboxUnreachable(f"cannot reach the sandbox at {self.base_url}: {error.strerror}; is it "
                                         f"running? ({method} {path})") from None
            except (TimeoutError, socket.timeout):
                self.close()
                raise SandboxError(f"{method} {url} timed out after {connection.timeout:g} s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as error:
                self.close()
                if attempt == 1 or not getattr(self._local, "reused", False):
                    raise SandboxError(f"{method} {url}: connection lost ({type(error).__name__}: {error})") from None
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise SandboxError(f"{method} {url}: HTTP {response.status} but the body is not JSON: {raw[:200]!r}",
                               status=response.status) from None
        if response.status >= 400 and response.status not in ok:
            message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
            raise SandboxError(f"{method} {url} failed: HTTP {response.status}: {message or raw[:200]!r}",
                               status=response.status)
        return payload

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        self._local.reused = connection is not None
        if connection is None:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.connection = connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def _parse(self, model: type[BaseModel], value: Any, path: str) -> Any:
        try:
            return model.model_validate(value)
        except ValidationError as error:
            first = error.errors()[0]
            raise SandboxError(f"{self.base_url + path}: unexpected response for {model.__name__}: "
                               f"{first['loc']}: {first['msg']}") from None
