"""Small networking helpers shared by the trainer launcher, the engine and the sandbox servers."""
from __future__ import annotations

import ipaddress
import socket

from megatron_rl.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Fail early, with the fix, when the port cannot be listened on (before any worker starts)."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535 (got {port})")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve ({exc})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (only its own processes reach it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
