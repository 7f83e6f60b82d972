"""What isolation this machine offers, and how a sandbox worker is started under it.

Layers, outermost first. `detect()` probes each at start-up; `Isolation.capabilities()` reports them (the
service's `GET /capabilities`, `megatron-rl sandbox capabilities`).

1. bubblewrap (Debian `bubblewrap` ≥ 0.8) namespaces: new PID, network (nothing but its own loopback),
   IPC, UTS, cgroup and mount namespaces. The root is an empty tmpfs, remounted read-only, holding /usr
   (with the /bin, /lib links), the interpreter's prefix and /etc's dynamic-linker cache, all read-only;
   a fresh /dev, the /proc of the worker's PID namespace, and size-capped tmpfs scratch at /tmp and
   /dev/shm. Nothing else of the host exists inside: no home directories, no /work, no server files, no
   server environment. Two ways to start it:
   * "bwrap-privileged" (the server is root with CAP_SYS_ADMIN): bwrap builds the namespaces as root and
     keeps only CAP_SETUID, CAP_SETGID and CAP_SETPCAP, with which the zygote empties its capability
     bounding set and switches to a per-worker uid that owns nothing on the host; the switch clears the
     remaining capabilities. bwrap also sets no_new_privs, so no setuid binary or file capability
     inside can give any back.
   * "bwrap-userns" (no CAP_SYS_ADMIN, or not root): bwrap runs unprivileged in a new user namespace
     (the kernel must allow unprivileged user namespaces); a root server first switches to the
     per-worker uid. The interpreter must then be reachable by that uid (not under a 0700 /root).
2. seccomp (PyPI `pyseccomp` over Debian's libseccomp2), loaded by bwrap: a deny-list of calls a judged
   program never needs and that could reach across runs or into the kernel: sockets other than Unix
   ones, SysV and POSIX IPC objects (they would outlive a run), ptrace and process_vm_*, namespace and
   mount calls, keyrings, BPF, perf, io_uring, userfaultfd, module and kexec loading.
3. cgroup v1 memory and pids controllers (when root can write them): one cgroup per worker, made once
   and reused (as k1.5 does); per run the pool sets the memory and task limits and reads the OOM-kill
   and fork-failure counters, which is what makes memory_limit and process_limit_hit exact.
4. rlimits, always: CPU time and core size; address space (RLIMIT_AS) and tasks (RLIMIT_NPROC) when no
   cgroup covers them. A per-worker uid or user namespace makes RLIMIT_NPROC count one worker's tasks.

Without bubblewrap the pool refuses to start unless told `allow_unisolated` (`--allow-unisolated`):
then programs run as plain child processes with rlimits only (and a per-worker uid when root).

Kubernetes (not tried here): a pod's RuntimeDefault seccomp and AppArmor profiles forbid the
unshare/mount calls bwrap needs, and runtimes mask parts of /proc so a new procfs cannot be mounted.
The sandbox container needs `securityContext: {privileged: true}` (then "bwrap-privileged" and, with a
writable /sys/fs/cgroup on cgroup v1, the cgroup layer), or else `seccompProfile: {type: Unconfined}`,
`appArmorProfile: {type: Unconfined}`, `procMount: Unmasked` on a node that allows unprivileged user
namespaces (then "bwrap-userns" with rlimits). cgroup v2 is not driven yet: there memory and tasks fall
back to rlimits, and /capabilities says so.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.reward.sandbox import zygote
from megatron_rl.reward.sandbox.protocol import Capabilities, IsolationMode

# Per-worker uids: far above the ranges that Debian (0-65535) and /etc/subuid (100000 upwards in steps
# of 65536) hand out, so they own no file on the host, and below 2**31, past which bwrap cannot write
# a user namespace's uid map. Each pool takes a random block of them, so that two pools on one host
# (a server and a `sandbox run`) almost never share a uid.
SANDBOX_UID_BASE = 2_000_000_000
UID_BLOCK = 4096  # the most workers one pool can have
_UID_BLOCKS = (2**31 - SANDBOX_UID_BASE) // UID_BLOCK
SCRATCH_DIRS = ("/tmp", "/dev/shm")
WORKER_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_ZYGOTE_SOURCE = Path(zygote.__file__).read_text()
_PROBE_TIMEOUT_S = 30.0
_CGROUP_CONTROLLERS = ("memory", "pids")

# Denied with EPERM (see the module docstring, layer 2). Names unknown to this architecture are skipped.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "shmget", "semget", "msgget", "mq_open",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "open_by_handle_at", "name_to_handle_at",
    "fanotify_init", "iopl", "ioperm", "vhangup", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)
_NAMESPACE_CLONE_FLAGS = (0x00000080, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                          0x40000000)  # CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET


@dataclass(frozen=True)
class Isolation:
    """The isolation chosen at start-up and everything needed to start workers under it."""

    mode: IsolationMode
    python: str  # the interpreter inside the sandbox
    bwrap: str | None
    bwrap_version: str | None
    seccomp_filter: bytes | None
    cgroup_parents: dict[str, Path]  # controller → the cgroup directory this server's tree goes under
    compiler: str | None  # g++, for C++ programs
    scratch_bytes: int
    notes: tuple[str, ...] = ()
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)

    @property
    def isolated(self) -> bool:
        return self.mode != "none"

    @property
    def per_worker_uid(self) -> bool:
        return self.as_root

    @property
    def process_limit_by(self) -> str:
        if "pids" in self.cgroup_parents:
            return "cgroup"
        # RLIMIT_NPROC counts a uid's tasks: per worker with per-worker uids or user namespaces.
        return "rlimit" if self.per_worker_uid or self.mode == "bwrap-userns" else "none"

    def capabilities(self) -> Capabilities:
        controllers = ", ".join(sorted(self.cgroup_parents))
        return Capabilities(
            isolated=self.isolated, mode=self.mode, bubblewrap=self.bwrap_version,
            seccomp=self.seccomp_filter is not None, cgroup=f"v1: {controllers}" if controllers else None,
            memory_limit_by="cgroup" if "memory" in self.cgroup_parents else "rlimit",
            process_limit_by=self.process_limit_by, per_worker_uid=self.per_worker_uid, python=self.python,
            languages=["python", "cpp"] if self.compiler else ["python"], notes=list(self.notes))

    def spawn_worker(self, uid: int | None, scratch: str | None = None) -> subprocess.Popen:
        """Start a worker's zygote (pipes on stdin/stdout), running programs as `uid` when root.
        `scratch` is its directory in mode "none".

        Call it from a thread that lives as long as the worker: bwrap's --die-with-parent ties the
        worker to the thread that started it.
        """
        if self.mode == "none":
            assert scratch is not None
            config = {"scratch": scratch, "clean": [scratch], "drop_to": [uid, uid] if uid is not None else None,
                      "pid_namespace": False}
            return _popen(self._zygote_argv(config), pass_fds=())
        config = {"scratch": SCRATCH_DIRS[0], "clean": list(SCRATCH_DIRS),
                  "drop_to": [uid, uid] if self.mode == "bwrap-privileged" else None, "pid_namespace": True}
        switch_to = uid if self.mode == "bwrap-userns" else None
        if self.seccomp_filter is None:
            return _popen(self._bwrap_argv(config, seccomp_fd=None), pass_fds=(), user=switch_to)
        seccomp_fd = os.memfd_create("seccomp", 0)  # not close-on-exec: bwrap reads it
        try:
            os.write(seccomp_fd, self.seccomp_filter)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            return _popen(self._bwrap_argv(config, seccomp_fd), pass_fds=(seccomp_fd,), user=switch_to)
        finally:
            os.close(seccomp_fd)

    def _zygote_argv(self, config: dict) -> list[str]:
        return [self.python, "-I", "-c", _ZYGOTE_SOURCE, json.dumps(config)]

    def _bwrap_argv(self, config: dict, seccomp_fd: int | None) -> list[str]:
        assert self.bwrap is not None
        argv = [self.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1", "--hostname", "sandbox"]
        if self.mode == "bwrap-privileged":
            # bwrap run by root keeps every capability unless told otherwise. These three let the
            # zygote empty its bounding set and switch to the worker uid, which clears them in turn.
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                     "--cap-add", "CAP_SETPCAP"]
        else:
            argv += ["--unshare-user", "--disable-userns"]
        argv += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        argv += ["--perms", "0755", "--dir", "/etc"]
        for path in ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime"):
            argv += ["--ro-bind-try", path, path]
        prefix = _interpreter_prefix(self.python)
        if prefix is not None:
            # Parents are made world-traversable: a host /root is 0700, which would lock out the worker uid.
            for parent in reversed(Path(prefix).parents[:-1]):
                argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", prefix, prefix]
        size = str(self.scratch_bytes)
        argv += ["--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
                 "--proc", "/proc", "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
                 "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
        for name, value in WORKER_ENVIRONMENT.items():
            argv += ["--setenv", name, value]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        return argv + ["--", *self._zygote_argv(config)]


def allocate_uid_block() -> int:
    """The first of UID_BLOCK consecutive uids for one pool's workers."""
    return SANDBOX_UID_BASE + random.randrange(_UID_BLOCKS) * UID_BLOCK


def _popen(argv: list[str], pass_fds: tuple[int, ...], user: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=pass_fds, env=WORKER_ENVIRONMENT, cwd="/",
        start_new_session=True, user=user, group=user, extra_groups=[] if user is not None else None)


def _interpreter_prefix(python: str) -> str | None:
    """The installation directory to bind for an interpreter outside /usr (the parent of its bin/)."""
    real = os.path.realpath(python)
    if real.startswith("/usr/"):
        return None
    return str(Path(real).parent.parent)


# ---------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------


def detect(*, python: str | None = None, bwrap: str = "bwrap", scratch_mb: int = 64, use_cgroups: bool = True,
           use_seccomp: bool = True, modes: tuple[IsolationMode, ...] | None = None) -> Isolation:
    """Probe this machine and choose the strongest isolation that works (see the module docstring).

    `modes` restricts which bwrap modes are tried, in order (tests use it to exercise one). The result's
    mode is "none" when no bwrap mode works; `notes` say why.
    """
    python = os.path.realpath(python or sys._base_executable)
    notes: list[str] = []
    seccomp_filter = None
    if use_seccomp:
        try:
            seccomp_filter = seccomp_filter_program()
        except (ImportError, OSError) as error:
            notes.append(f"seccomp: off, cannot build the filter ({error}); pip install pyseccomp and "
                         "apt-get install libseccomp2")
    cgroup_parents: dict[str, Path] = {}
    if use_cgroups:
        cgroup_parents, problem = _writable_cgroup_parents()
        if problem:
            notes.append(f"cgroups: off, {problem}; memory and task limits use rlimits")
    compiler = shutil.which("g++")
    if compiler is not None and not os.path.realpath(compiler).startswith("/usr/"):
        notes.append(f"cpp: off, g++ at {compiler} is outside /usr, which is all the sandbox sees")
        compiler = None
    elif compiler is None:
        notes.append("cpp: off, g++ not found (apt-get install g++)")
    base = dict(python=python, bwrap=None, bwrap_version=None, seccomp_filter=seccomp_filter,
                cgroup_parents=cgroup_parents, compiler=compiler, scratch_bytes=scratch_mb << 20)
    bwrap_path = shutil.which(bwrap)
    if bwrap_path is None:
        notes.append(f"bubblewrap: {bwrap!r} not found (apt-get install bubblewrap)")
        return Isolation(mode="none", **base, notes=tuple(notes))
    version = subprocess.run([bwrap_path, "--version"], capture_output=True, text=True).stdout.strip()
    base.update(bwrap=bwrap_path, bwrap_version=version)
    if modes is None:
        modes = ("bwrap-privileged", "bwrap-userns") if os.geteuid() == 0 else ("bwrap-userns",)
    for mode in modes:
        candidate = Isolation(mode=mode, **base)
        problem = _probe(candidate)
        if problem and candidate.seccomp_filter is not None:
            without_seccomp = Isolation(mode=mode, **dict(base, seccomp_filter=None))
            if _probe(without_seccomp) is None:
                notes.append(f"seccomp: off, bwrap refused the filter in mode {mode} ({problem})")
                return Isolation(mode=mode, **dict(base, seccomp_filter=None), notes=tuple(notes))
        if problem is None:
            return Isolation(mode=mode, **base, notes=tuple(notes))
        notes.append(f"{mode}: {problem}")
    return Isolation(mode="none", **base, notes=tuple(notes))


def _probe(isolation: Isolation) -> str | None:
    """Start one worker and wait for its zygote to be ready; None when that works, else why not."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            uid = allocate_uid_block() if isolation.per_worker_uid else None
            process = isolation.spawn_worker(uid, scratch)
        except OSError as error:
            return f"cannot start: {error}"
        try:
            ready = zygote.read_frame(process.stdout.fileno(), time.monotonic() + _PROBE_TIMEOUT_S)
        except zygote.FrameError as error:
            ready = None
            reason = str(error)
        else:
            reason = "exited before it was ready"
        finally:
            process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            process.stdout.close()
        if ready == {"ready": True}:
            return None
        return f"the sandbox did not start ({reason}, exit status {process.returncode})"


def seccomp_filter_program() -> bytes:
    """The BPF program of the deny-list (layer 2), as bwrap's --seccomp reads it."""
    import pyseccomp as seccomp

    deny = seccomp.ERRNO(errno.EPERM)
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in _DENIED_SYSCALLS:
        try:
            syscall_filter.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            pass  # not a syscall on this architecture
    syscall_filter.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    # clone3 passes its flags in memory, out of a filter's sight: answer ENOSYS so that libc falls back
    # to clone, whose flags the rules below can check.
    syscall_filter.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NAMESPACE_CLONE_FLAGS:
        syscall_filter.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    with tempfile.TemporaryFile() as handle:
        syscall_filter.export_bpf(handle)
        handle.seek(0)
        return handle.read()


# ---------------------------------------------------------------------------------------------------
# cgroup v1
# ---------------------------------------------------------------------------------------------------


def _writable_cgroup_parents() -> tuple[dict[str, Path], str | None]:
    """Our own cgroup directory per controller (v1), if we may create children there; else why not."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] == "cgroup":
                options = set(fields[separator + 3].split(","))
                for controller in _CGROUP_CONTROLLERS:
                    if controller in options:
                        mounts[controller] = Path(fields[4])
    missing = [c for c in _CGROUP_CONTROLLERS if c not in mounts]
    if missing:
        return {}, f"no cgroup v1 hierarchy for {', '.join(missing)} (cgroup v2 is not supported yet)"
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    parents = {c: mounts[c] / own.get(c, "/").lstrip("/") for c in _CGROUP_CONTROLLERS}
    for controller, parent in parents.items():
        probe = parent / f"megatron-rl-sandbox-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as error:
            return {}, f"cannot create a {controller} cgroup under {parent} ({error.strerror})"
    return parents, None


@dataclass(frozen=True)
class CgroupRunStats:
    oom_killed: bool
    process_limit_hit: bool
    memory_peak_bytes: int


class CgroupTree:
    """This server's cgroups: one directory per controller, with one child per worker, removed on close."""

    def __init__(self, parents: dict[str, Path]):
        _remove_stale_trees(parents)
        name = f"megatron-rl-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.roots = {controller: parent / name for controller, parent in parents.items()}
        for root in self.roots.values():
            root.mkdir()

    def worker(self, index: int) -> WorkerCgroup:
        return WorkerCgroup({controller: root / f"worker-{index}" for controller, root in self.roots.items()})

    def remove(self) -> None:
        for root in self.roots.values():
            for child in root.iterdir():
                if child.is_dir():
                    WorkerCgroup.remove_directory(child)
            WorkerCgroup.remove_directory(root)


def _remove_stale_trees(parents: dict[str, Path]) -> None:
    """Trees left by servers that died without closing (their pid is in the name and no longer runs)."""
    pattern = re.compile(r"megatron-rl-sandbox-(\d+)-[0-9a-f]{8}")
    for parent in parents.values():
        for tree in parent.iterdir():
            match = pattern.fullmatch(tree.name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                for child in tree.iterdir():
                    if child.is_dir():
                        WorkerCgroup.remove_directory(child)
                WorkerCgroup.remove_directory(tree)


class WorkerCgroup:
    """One worker's memory and pids cgroups, reused by all its runs."""

    def __init__(self, directories: dict[str, Path]):
        self.directories = directories
        for directory in directories.values():
            directory.mkdir(exist_ok=True)
        self.memory = directories["memory"]
        self.pids = directories["pids"]

    def attach(self, pid: int) -> None:
        for directory in self.directories.values():
            (directory / "cgroup.procs").write_text(str(pid))

    def begin_run(self, memory_bytes: int, tasks: int) -> dict[str, int]:
        """Let the run use `memory_bytes` and `tasks` beyond what the idle worker holds; counters to compare after."""
        usage = int((self.memory / "memory.usage_in_bytes").read_text())
        (self.memory / "memory.limit_in_bytes").write_text(str(usage + memory_bytes))
        (self.memory / "memory.max_usage_in_bytes").write_text("0")  # resets the peak to the current usage
        (self.pids / "pids.max").write_text(str(int((self.pids / "pids.current").read_text()) + tasks))
        return {"usage": usage, "oom_kill": self._oom_kills(), "fork_failures": self._fork_failures()}

    def end_run(self, before: dict[str, int]) -> CgroupRunStats:
        peak = int((self.memory / "memory.max_usage_in_bytes").read_text())
        return CgroupRunStats(oom_killed=self._oom_kills() > before["oom_kill"],
                              process_limit_hit=self._fork_failures() > before["fork_failures"],
                              memory_peak_bytes=max(0, peak - before["usage"]))

    def kill_all(self) -> None:
        for _ in range(100):
            pids = [int(pid) for d in self.directories.values() for pid in (d / "cgroup.procs").read_text().split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for directory in self.directories.values():
            self.remove_directory(directory)

    @staticmethod
    def remove_directory(directory: Path) -> None:
        # A cgroup whose last task just died stays busy for a moment.
        for _ in range(100):
            try:
                directory.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
                time.sleep(0.01)

    def _oom_kills(self) -> int:
        return _counter(self.memory / "memory.oom_control", "oom_kill")

    def _fork_failures(self) -> int:
        return _counter(self.pids / "pids.events", "max")


def _counter(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    raise RuntimeError(f"{path} has no {name!r} counter (kernel too old for exact memory/process verdicts)")
