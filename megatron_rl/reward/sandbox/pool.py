"""A pre-warmed pool of sandbox workers: `SandboxPool.run(RunRequest) -> RunResult`.

Each worker is one sandbox (see `isolation.py`) holding a zygote (see `zygote.py`) that has already
started its interpreter; a run costs a fork inside it, not a sandbox and interpreter start-up. A worker
runs one program at a time; `run` takes an idle worker, waiting for one if all are busy, so at most
`workers` programs run at once. Thread-safe.

Per run the pool sets the worker's cgroup limits (when there are cgroups), sends the program to the
zygote, and turns the zygote's report and the cgroup counters into a verdict (`RunResult.status`). A
worker that dies or stops answering is killed and started again on its next use; the run it was doing
gets the verdict `killed`.

Workers are started on one long-lived thread: bwrap's --die-with-parent kills a sandbox when the
*thread* that started it ends, which would happen with a request thread.
"""
from __future__ import annotations

import base64
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from megatron_rl.errors import UserError
from megatron_rl.reward.sandbox import zygote
from megatron_rl.reward.sandbox.isolation import (
    UID_BLOCK, CgroupRunStats, CgroupTree, Isolation, WorkerCgroup, allocate_uid_block, detect,
)
from megatron_rl.reward.sandbox.protocol import Health, RunRequest, RunResult, SandboxError

MiB = 1 << 20
# Beyond the run's own limits, the zygote's answer may take this long (killing, reaping, encoding).
ANSWER_GRACE_S = 10.0
START_TIMEOUT_S = 30.0
# The C++ compiler gets its own limits, whatever the program's are.
COMPILE_TIMEOUT_S = 60.0
COMPILE_MEMORY_MB = 2048
COMPILE_MAX_PROCESSES = 32
CPP_COMPILE_ARGS = ("-std=c++17", "-O2", "-pipe", "-o", "main", "main.cpp")
# Signals that mean the program itself faulted (a runtime error), as opposed to being killed.
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGBUS, signal.SIGILL,
                           signal.SIGTRAP, signal.SIGSYS})


class Sandbox(Protocol):
    """Anything that runs programs: the in-process `SandboxPool` or the HTTP `SandboxClient`."""

    def run(self, request: RunRequest) -> RunResult: ...


class WorkerLost(Exception):
    """The worker died, or did not answer in time."""


class _Worker:
    def __init__(self, index: int, isolation: Isolation, uid: int | None, cgroup: WorkerCgroup | None):
        self.index = index
        self.isolation = isolation
        self.uid = uid
        self.cgroup = cgroup
        self.process: subprocess.Popen | None = None
        self.zygote_pid: int | None = None  # as the host sees it
        # Mode "none" has no tmpfs of its own: the worker gets a private directory.
        self.scratch = tempfile.mkdtemp(prefix=f"megatron-rl-sandbox-{index}-") if not isolation.isolated else None
        if self.scratch is not None and uid is not None:
            os.chown(self.scratch, uid, uid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the process (on the pool's spawner thread); `handshake` finishes the start."""
        self.process = self.isolation.spawn_worker(self.uid, self.scratch)

    def handshake(self) -> None:
        assert self.process is not None
        try:
            ready = zygote.read_frame(self.process.stdout.fileno(), time.monotonic() + START_TIMEOUT_S)
        except zygote.FrameError as error:
            ready = {"error": str(error)}
        if ready != {"ready": True}:
            self.stop()
            raise SandboxError(f"sandbox worker {self.index} did not start: {ready or 'it exited'}; "
                               f"see `megatron-rl sandbox capabilities`")
        self.zygote_pid = _zygote_pid(self.process.pid, self.isolation.isolated)
        if self.cgroup is not None:
            # The zygote has forked nothing yet, so moving it moves the whole worker. (Runs raise their
            # oom_score_adj to 1000, so the cgroup's OOM killer takes them, not the zygote.)
            self.cgroup.attach(self.zygote_pid)

    def execute(self, message: dict, answer_within_s: float) -> dict:
        if not self.alive:
            raise WorkerLost(f"worker {self.index} is not running")
        try:
            zygote.write_frame(self.process.stdin.fileno(), message)
            report = zygote.read_frame(self.process.stdout.fileno(), time.monotonic() + answer_within_s)
        except (OSError, zygote.FrameError) as error:
            raise WorkerLost(f"worker {self.index}: {error}") from None
        if report is None:
            raise WorkerLost(f"worker {self.index} exited (status {self.process.wait()})")
        if report.get("error"):
            raise SandboxError(f"sandbox worker {self.index} could not run the program: {report['error']}")
        return report

    def stop(self) -> None:
        if self.process is not None:
            # Killing the zygote (PID 1 of its namespace) ends every process of the worker, and lets bwrap
            # reap it and exit; killing bwrap first would leave the zygote a zombie for the host's init.
            # While bwrap runs, the zygote's pid cannot have been reused: it is bwrap's unreaped child.
            if self.zygote_pid is not None and self.process.poll() is None:
                _kill_quietly(self.zygote_pid)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_quietly(-self.process.pid)  # its process group
                self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
            self.process = None
            self.zygote_pid = None
        if self.cgroup is not None:
            self.cgroup.kill_all()  # in mode "none" a run's processes do not die with the worker

    def close(self) -> None:
        self.stop()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _zygote_pid(launcher_pid: int, isolated: bool) -> int:
    """The host pid of the zygote: bwrap's only child (--as-pid-1), or the launched process itself."""
    if not isolated:
        return launcher_pid
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as handle:
            children = handle.read().split()
        if children:
            return int(children[0])
        time.sleep(0.001)
    raise SandboxError(f"bwrap (pid {launcher_pid}) started no sandbox process")


class SandboxPool:
    """`workers` pre-started sandboxes (default: one per CPU core). Use as a context manager or call `close()`."""

    def __init__(self, isolation: Isolation | None = None, *, workers: int | None = None,
                 allow_unisolated: bool = False):
        self.isolation = isolation or detect()
        if not self.isolation.isolated and not allow_unisolated:
            raise UserError("no isolation for untrusted code on this machine: " + "; ".join(self.isolation.notes)
                            + ". Fix that, or pass --allow-unisolated (allow_unisolated=True) to run programs "
                              "as plain processes with rlimits only")
        count = workers if workers is not None else os.cpu_count() or 1
        if not 1 <= count <= UID_BLOCK:
            raise UserError(f"--workers must be in 1..{UID_BLOCK} (got {count})")
        uid_base = allocate_uid_block() if self.isolation.per_worker_uid else None
        # The uid each worker runs programs as (None: the server's own uid).
        self.worker_uids = [uid_base + index if uid_base is not None else None for index in range(count)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.runs = 0
        self.worker_restarts = 0
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawner")
        self._cgroups: CgroupTree | None = None
        self._workers: list[_Worker] = []
        try:
            if self.isolation.cgroup_parents:
                self._cgroups = CgroupTree(self.isolation.cgroup_parents)
            for index, uid in enumerate(self.worker_uids):
                self._workers.append(_Worker(index, self.isolation, uid,
                                             self._cgroups.worker(index) if self._cgroups else None))
                self._spawner.submit(self._workers[-1].spawn).result()
            for worker in self._workers:  # the interpreters start in parallel
                worker.handshake()
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def health(self) -> Health:
        return Health(status="closed" if self._closed else "ok", workers=len(self._workers),
                      idle_workers=self._idle.qsize(), runs=self.runs, worker_restarts=self.worker_restarts)

    def close(self) -> None:
        """Stop every worker (runs in progress end as `killed`) and remove the cgroups."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for worker in self._workers:
            worker.close()
        if self._cgroups is not None:
            self._cgroups.remove()
        self._spawner.shutdown()

    def run(self, request: RunRequest) -> RunResult:
        worker = self._take()
        try:
            if not worker.alive:
                self._restart(worker)
            if request.language == "cpp":
                return self._run_cpp(worker, request)
            message = _run_message(request, kind="python", argv=["main.py"], files={"main.py": request.program})
            return self._execute(worker, message, request)
        except WorkerLost as lost:
            self._restart_quietly(worker)
            return _lost_result(str(lost))
        finally:
            with self._lock:
                self.runs += 1
            self._idle.put(worker)

    def _take(self) -> _Worker:
        while True:
            if self._closed:
                raise SandboxError("the sandbox pool is closed", status=503)
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue

    def _restart(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            self.worker_restarts += 1
        self._spawner.submit(worker.spawn).result()
        worker.handshake()

    def _restart_quietly(self, worker: _Worker) -> None:
        """Restart now if possible; otherwise the next run on this worker tries again."""
        if self._closed:
            return
        try:
            self._restart(worker)
        except SandboxError:
            pass

    def _run_cpp(self, worker: _Worker, request: RunRequest) -> RunResult:
        if self.isolation.compiler is None:
            raise SandboxError("cpp: no g++ on the sandbox host (apt-get install g++)", status=400)
        compile_request = RunRequest(program=request.program, language="cpp", timeout_s=COMPILE_TIMEOUT_S,
                                     memory_mb=COMPILE_MEMORY_MB, max_processes=COMPILE_MAX_PROCESSES,
                                     max_output_bytes=request.max_output_bytes)
        message = _run_message(compile_request, kind="exec", argv=[self.isolation.compiler, *CPP_COMPILE_ARGS],
                               files={"main.cpp": request.program}, keep_scratch=True)
        compiled = self._execute(worker, message, compile_request)
        if compiled.status != "ok":
            reason = (f"exit status {compiled.exit_code}" if compiled.status == "runtime_error"
                      else f"{compiled.status}: {compiled.message}")
            return compiled.model_copy(update={"status": "compile_error", "message": f"compilation failed ({reason})"})
        message = _run_message(request, kind="exec", argv=["./main"], files={}, reuse_scratch=True)
        return self._execute(worker, message, request)

    def _execute(self, worker: _Worker, message: dict, request: RunRequest) -> RunResult:
        before = None
        if worker.cgroup is not None:
            # The zygote's own buffers (stdin, captured output) are charged to the worker's cgroup too.
            allowance = 2 * request.max_output_bytes + len(request.stdin.encode()) + 32 * MiB
            before = worker.cgroup.begin_run(request.memory_mb * MiB + allowance, request.max_processes)
        else:
            message["address_space_bytes"] = request.memory_mb * MiB
            if self.isolation.process_limit_by == "rlimit":
                message["max_processes"] = request.max_processes + 1  # the uid's count includes the zygote
        report = worker.execute(message, request.timeout_s + ANSWER_GRACE_S)
        stats = worker.cgroup.end_run(before) if worker.cgroup is not None else None
        return _verdict(report, stats, request)


def _run_message(request: RunRequest, *, kind: str, argv: list[str], files: dict[str, str],
                 keep_scratch: bool = False, reuse_scratch: bool = False) -> dict:
    """The zygote's run request (see `zygote.run`) for `request`."""
    return {
        "kind": kind, "argv": argv,
        "files": {name: base64.b64encode(text.encode()).decode() for name, text in files.items()},
        "stdin": base64.b64encode(request.stdin.encode()).decode(),
        "wall_time_s": request.timeout_s, "cpu_time_s": request.cpu_limit_s,
        "max_output_bytes": request.max_output_bytes,
        "keep_scratch": keep_scratch, "reuse_scratch": reuse_scratch,
        # rlimits that stand in for a missing cgroup; set by `SandboxPool._execute`.
        "address_space_bytes": None, "max_processes": None,
    }


def _verdict(report: dict, stats: CgroupRunStats | None, request: RunRequest) -> RunResult:
    signal_number = report["signal"]
    signal_name = signal.Signals(signal_number).name if signal_number is not None else None
    common = dict(
        exit_code=report["exit_code"], signal=signal_name, wall_time_s=round(report["wall_time_s"], 6),
        cpu_time_s=round(report["cpu_time_s"], 6),
        memory_peak_mb=round(stats.memory_peak_bytes / MiB, 3) if stats is not None else None,
        process_limit_hit=stats.process_limit_hit if stats is not None else None,
        stdout=base64.b64decode(report["stdout"]).decode(errors="replace"),
        stderr=base64.b64decode(report["stderr"]).decode(errors="replace"),
        stdout_truncated=report["stdout_truncated"], stderr_truncated=report["stderr_truncated"])
    status, message = _classify(report, stats, request, signal_number, signal_name)
    if stats is not None and stats.process_limit_hit and status != "ok":
        message += f"; a fork failed at the limit of {request.max_processes} processes"
    return RunResult(status=status, message=message, **common)


def _classify(report: dict, stats: CgroupRunStats | None, request: RunRequest, signal_number: int | None,
              signal_name: str | None) -> tuple[str, str]:
    if report["output_limit_exceeded"]:
        return "output_limit", f"killed: wrote more than max_output_bytes={request.max_output_bytes}"
    if (stats is not None and stats.oom_killed) or report["memory_error"]:
        return "memory_limit", f"went past memory_mb={request.memory_mb}"
    if report["wall_time_exceeded"]:
        return "timeout", f"killed: still running after timeout_s={request.timeout_s:g} (wall clock)"
    # RLIMIT_CPU stops each process at whole seconds (SIGXCPU); the total is checked against the exact limit.
    if signal_number == signal.SIGXCPU or report["cpu_time_s"] > request.cpu_limit_s:
        return "timeout", (f"used {report['cpu_time_s']:.3f} s of CPU time, more than "
                           f"cpu_time_s={request.cpu_limit_s:g}")
    if report["exit_code"] == 0:
        return "ok", "exited with status 0"
    if report["exit_code"] is not None:
        return "runtime_error", f"exited with status {report['exit_code']}"
    if signal_number in FAULT_SIGNALS:
        return "runtime_error", f"crashed with {signal_name}"
    return "killed", f"ended by {signal_name}"


def _lost_result(reason: str) -> RunResult:
    return RunResult(status="killed", message=f"the sandbox worker was lost and has been restarted ({reason})",
                     wall_time_s=0.0, cpu_time_s=0.0)
