"""The pre-started interpreter inside each sandbox worker (a "zygote"): it forks one fresh process per run.

Standard library only: it runs on the sandbox's interpreter, which sees none of the project's packages.
The pool (`pool.py`) starts it as `python -I -c <this file's source> <config JSON>` (inside bubblewrap,
normally as PID 1 of the worker's PID namespace) and talks to it over the zygote's stdin and stdout in
frames: a 4-byte big-endian length, then a JSON object.

    zygote → pool   {"ready": true}          once, after start-up
    pool → zygote   a run request             (keys: see `run`)
    zygote → pool   the run's report          (keys: see `run`)

Why a zygote: a Python interpreter takes 20-400 ms to start (more on a loaded machine) while a fork of one
that has started takes about a millisecond. Each run is still a new process with its own limits: the child
starts a new session, sets its rlimits, gets a fixed environment, stdin from a memfd, stdout and stderr on
pipes that this process reads (and caps), and the scratch directory as its working directory. A Python
program then runs in that child in a new `__main__` module; anything else is exec'd. After the run every
process it left behind is killed and reaped, and the scratch directories are emptied, so the next run
starts from the same state. (Forked runs share this interpreter's hash seed, so `set` iteration order does
not vary between runs of one worker as it would between fresh interpreters.)

Config (argv[1], JSON): `scratch` (working directory of runs), `clean` (directories emptied after each
run), `drop_to` ([uid, gid] to switch to at start-up, or null), `pid_namespace` (true when this process
is PID 1 of a namespace that holds only the worker; otherwise it becomes a child subreaper and kills the
run's processes one by one).
"""
from __future__ import annotations

import base64
import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time

MAX_FRAME_BYTES = 1 << 30
_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
# The child's fd on which it reports an uncaught MemoryError (a Python program under RLIMIT_AS).
_STATUS_FD = 3
# How often the supervisor reaps processes that the run orphaned while the run goes on.
_REAP_INTERVAL_S = 0.05
_READ_CHUNK = 1 << 16
_LIBC = ctypes.CDLL(None, use_errno=True)
_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


# ---------------------------------------------------------------------------------------------------
# Framing (also imported by the pool)
# ---------------------------------------------------------------------------------------------------


class FrameError(Exception):
    """The other side closed the channel, timed out, or sent something that is not a frame."""


def write_frame(fd: int, message: dict) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def read_frame(fd: int, deadline: float | None = None) -> dict | None:
    """The next message; None on a clean end of input; FrameError on a timeout or a torn frame."""
    header = _read_exactly(fd, _HEADER.size, deadline, allow_eof=True)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    payload = _read_exactly(fd, length, deadline, allow_eof=False)
    try:
        return json.loads(payload)
    except ValueError as error:
        raise FrameError(f"frame is not JSON: {error}") from None


def _read_exactly(fd: int, count: int, deadline: float | None, allow_eof: bool) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise FrameError("no answer in time")
        chunk = os.read(fd, count - len(data))
        if not chunk:
            if allow_eof and not data:
                return None
            raise FrameError("channel closed in the middle of a frame")
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------------------------------
# The zygote
# ---------------------------------------------------------------------------------------------------


def main() -> None:
    config = json.loads(sys.argv[1])
    # The control channel moves off 0/1 so that nothing a run inherits or prints can reach it.
    control_in, control_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    # As PID 1, signals without a handler are ignored; Python's SIGINT handler would let a run stop us.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if config["drop_to"] is not None:
        uid, gid = config["drop_to"]
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            for capability in range(int(handle.read()) + 1):
                _prctl(_PR_CAPBSET_DROP, capability)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaves no capabilities, and makes this process non-dumpable
    if not config["pid_namespace"]:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    write_frame(control_out, {"ready": True})
    while True:
        request = read_frame(control_in)
        if request is None:
            return
        try:
            report = run(request, config)
        except Exception as error:  # a bug or a broken scratch dir: report it, keep serving
            report = {"error": f"{type(error).__name__}: {error}"}
        write_frame(control_out, report)


def run(request: dict, config: dict) -> dict:
    """Run one program and report what happened.

    Request keys: `files` ({name: base64}, written into scratch first), `kind` ("python": run
    `argv[0]`, a file in scratch, in a forked child; "exec": execve `argv`), `argv`, `stdin` (base64),
    `wall_time_s`, `cpu_time_s`, `address_space_bytes` (RLIMIT_AS above the child's size at fork, or
    null), `max_processes` (RLIMIT_NPROC, or null), `max_output_bytes` (stdout + stderr), `keep_scratch`
    (leave the files for the next run, e.g. a compiled binary), `reuse_scratch` (this is that next run:
    do not empty the scratch directories first).

    Report keys: `exit_code` / `signal` (one is null), `wall_time_s`, `cpu_time_s` (all of the run's
    processes), `stdout` / `stderr` (base64, at most `max_output_bytes` together), `stdout_truncated`,
    `stderr_truncated`, `output_limit_exceeded`, `wall_time_exceeded`, `memory_error` (a Python program
    died of MemoryError), `error` (null, or why the run could not be started).
    """
    scratch = config["scratch"]
    if not request["reuse_scratch"]:
        for directory in config["clean"]:
            _empty(directory)
    try:
        for name, encoded in request["files"].items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} must be a plain name")
            with open(os.path.join(scratch, name), "wb") as handle:
                handle.write(base64.b64decode(encoded))
        stdin = os.memfd_create("stdin")
        os.write(stdin, base64.b64decode(request["stdin"]))
        os.lseek(stdin, 0, os.SEEK_SET)
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        status_read, status_write = os.pipe()
        cpu_time_before = _children_cpu_time()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _child(request, config, stdin, stdout_write, stderr_write, status_write)
            except BaseException as error:
                _write_quietly(2, f"sandbox: cannot start the program: {error}\n")
            finally:
                os._exit(127)
        for fd in (stdin, stdout_write, stderr_write, status_write):
            os.close(fd)
        try:
            report = _supervise(pid, started, request, stdout_read, stderr_read, config["pid_namespace"])
            # Every process of the run is gone, so these reads cannot block.
            report["memory_error"] = os.read(status_read, 64) != b""
            report["cpu_time_s"] = _children_cpu_time() - cpu_time_before
        finally:
            for fd in (stdout_read, stderr_read, status_read):
                os.close(fd)
    finally:
        if not request["keep_scratch"]:
            for directory in config["clean"]:
                _empty(directory)
    report["error"] = None
    return report


def _supervise(pid: int, started: float, request: dict, stdout_read: int, stderr_read: int,
               pid_namespace: bool) -> dict:
    deadline = started + request["wall_time_s"]
    limit = request["max_output_bytes"]
    captured = {stdout_read: bytearray(), stderr_read: bytearray()}
    dropped = {stdout_read: 0, stderr_read: 0}
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (stdout_read, stderr_read, pidfd):
        poller.register(fd, select.POLLIN)

    def take(fd: int, chunk: bytes) -> None:
        room = max(0, limit - len(captured[stdout_read]) - len(captured[stderr_read]))
        captured[fd] += chunk[:room]
        dropped[fd] += max(0, len(chunk) - room)

    status = None
    wall_time_exceeded = False
    try:
        while status is None and not any(dropped.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                wall_time_exceeded = True
                break
            for fd, _ in poller.poll(min(remaining, _REAP_INTERVAL_S) * 1000):
                if fd == pidfd:
                    continue
                chunk = os.read(fd, _READ_CHUNK)
                if chunk:
                    take(fd, chunk)
                else:
                    poller.unregister(fd)
            status = _reap(pid)
        wall_time_s = time.monotonic() - started
        reaped = _kill_run(pid, pid_namespace)
        status = reaped if status is None else status
    finally:
        os.close(pidfd)
    # Every writer is gone now: read what is left in the pipes, still within the limit.
    for fd in (stdout_read, stderr_read):
        while chunk := os.read(fd, _READ_CHUNK):
            take(fd, chunk)
    exit_code = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": exit_code if exit_code >= 0 else None,
        "signal": -exit_code if exit_code < 0 else None,
        "wall_time_s": wall_time_s,
        "stdout": base64.b64encode(captured[stdout_read]).decode(),
        "stderr": base64.b64encode(captured[stderr_read]).decode(),
        "stdout_truncated": dropped[stdout_read] > 0,
        "stderr_truncated": dropped[stderr_read] > 0,
        "output_limit_exceeded": any(dropped.values()),
        "wall_time_exceeded": wall_time_exceeded,
    }


def _reap(main_pid: int) -> int | None:
    """Reap every finished child (orphans of the run are re-parented to us); the main child's status if it ended."""
    main_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return main_status
        if pid == 0:
            return main_status
        if pid == main_pid:
            main_status = status


def _kill_run(main_pid: int, pid_namespace: bool) -> int | None:
    """SIGKILL every process of the run and reap them all; the main child's wait status if reaped here."""
    main_status = None
    while True:
        try:
            if pid_namespace:
                os.kill(-1, signal.SIGKILL)  # from PID 1: every other process in the namespace
            else:
                for pid in _children():
                    os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # nothing left to signal (or it just ended): the wait below tells
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return main_status
        if pid == main_pid:
            main_status = status


def _children() -> list[int]:
    children = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as handle:
            children += [int(pid) for pid in handle.read().split()]
    return children


def _children_cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _empty(directory: str) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            _make_tree_writable(entry.path)  # a run may leave directories it made unreadable
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _make_tree_writable(top: str) -> None:
    os.chmod(top, 0o700)
    for root, directories, _ in os.walk(top):  # top-down: each is opened after it was made readable
        for name in directories:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


# ---------------------------------------------------------------------------------------------------
# The child: from here on, this process belongs to the run
# ---------------------------------------------------------------------------------------------------


def _child(request: dict, config: dict, stdin: int, stdout: int, stderr: int, status: int) -> None:
    os.setsid()
    for target, fd in ((0, stdin), (1, stdout), (2, stderr), (_STATUS_FD, status)):
        os.dup2(fd, target)
    os.closerange(_STATUS_FD + 1, os.sysconf("SC_OPEN_MAX"))
    os.chdir(config["scratch"])
    os.umask(0o022)
    # Dropping privileges left us non-dumpable: /proc/self would belong to root and be closed to the run.
    _prctl(_PR_SET_DUMPABLE, 1)
    if not config["pid_namespace"]:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")  # under a memory cgroup the kernel kills the run, never the zygote
    except OSError:
        pass  # no /proc: then no memory cgroup either
    cpu_seconds = max(1, math.ceil(request["cpu_time_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if request["max_processes"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (request["max_processes"],) * 2)
    if request["address_space_bytes"] is not None:
        with open("/proc/self/statm") as handle:
            size = os.sysconf("SC_PAGE_SIZE") * int(handle.read().split()[0])
        start = size if request["kind"] == "python" else 0  # a forked run already holds our mappings
        resource.setrlimit(resource.RLIMIT_AS, (start + request["address_space_bytes"],) * 2)
    environment = dict(_ENVIRONMENT, HOME=config["scratch"], TMPDIR=config["scratch"])
    if request["kind"] == "exec":
        for number in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; an exec'd program must not
            signal.signal(number, signal.SIG_DFL)
        os.close(_STATUS_FD)
        os.execve(request["argv"][0], request["argv"], environment)
    os.environ.clear()
    os.environ.update(environment)
    os._exit(_run_python(os.path.join(config["scratch"], request["argv"][0])))


def _run_python(path: str) -> int:
    """Run the file as `python FILE` would, in this fresh process; its exit status."""
    import atexit
    import builtins

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [os.path.basename(path)]
    sys.path.insert(0, os.path.dirname(path))
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                       buffering=1)
    module = type(sys)("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    exit_code = 0
    try:
        with open(path, "rb") as handle:
            source = handle.read()
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit as stop:
        exit_code = _exit_status(stop.code)
    except BaseException as error:
        if isinstance(error, MemoryError):
            os.write(_STATUS_FD, b"memory")
        if error.__traceback__ is not None:
            error.__traceback__ = error.__traceback__.tb_next  # without this runner's own frame
        try:
            sys.excepthook(type(error), error, error.__traceback__)
        except BaseException:
            _write_quietly(2, f"{type(error).__name__}\n")
        exit_code = 1
    # What the interpreter does at exit: wait for non-daemon threads, run atexit, flush.
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as stop:
        exit_code = _exit_status(stop.code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            exit_code = exit_code or 120  # CPython's status when flushing stdout at exit fails
    return exit_code


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _write_quietly(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode(errors="replace"))
    except OSError:
        pass


def _prctl(option: int, value: int) -> None:
    if _LIBC.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


if __name__ == "__main__":
    main()
