"""The code-execution sandbox: isolation layers, verdicts, adversarial programs, HTTP service and CLI.

Everything runs for real: bubblewrap sandboxes, seccomp, cgroups (when this machine has v1 ones), a
server subprocess on 127.0.0.1. Without bubblewrap every test fails with the fix in its message.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from megatron_rl.errors import UserError
from megatron_rl.net import free_port
from megatron_rl.reward.sandbox import commands
from megatron_rl.reward.sandbox.client import SandboxClient
from megatron_rl.reward.sandbox.isolation import Isolation, detect
from megatron_rl.reward.sandbox.pool import SandboxPool
from megatron_rl.reward.sandbox.protocol import RunRequest, SandboxUnreachable

REPO = Path(__file__).resolve().parents[1]


def _require_isolation(isolation: Isolation, seccomp: bool = True) -> Isolation:
    if not isolation.isolated:
        pytest.fail("the sandbox has no isolation on this machine: " + "; ".join(isolation.notes)
                    + " (run as root after `apt-get install -y bubblewrap`)")
    if seccomp and isolation.seccomp_filter is None:
        pytest.fail("the sandbox has no seccomp layer: " + "; ".join(isolation.notes))
    return isolation


@pytest.fixture(scope="module")
def isolation() -> Isolation:
    return _require_isolation(detect())


@pytest.fixture(scope="module")
def pool(isolation):
    """One worker, so that consecutive runs share it (cleanliness and "keeps serving" checks)."""
    with SandboxPool(isolation, workers=1) as single:
        yield single


@pytest.fixture(scope="module")
def rlimit_pool():
    """The fallback without cgroups: memory and processes bounded by rlimits alone."""
    with SandboxPool(_require_isolation(detect(use_cgroups=False)), workers=1) as single:
        assert single.isolation.capabilities().memory_limit_by == "rlimit"
        yield single


def run(pool: SandboxPool, program: str, **limits):
    return pool.run(RunRequest(program=textwrap.dedent(program), **limits))


def sandbox_processes(pool: SandboxPool) -> list[int]:
    """Host pids of every process running as one of the pool's worker uids."""
    uids = {str(uid) for uid in pool.worker_uids}
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid_line = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if uid_line.split()[1] in uids:
                pids.append(int(entry.name))
    return pids


def assert_only_zygotes_left(pool: SandboxPool) -> None:
    """Only the idle workers' processes remain: each zygote (and in user-namespace mode, its bwrap, which
    runs as the worker uid too). The kill and reap happen before the verdict returns: no waiting needed."""
    per_worker = 2 if pool.isolation.mode == "bwrap-userns" else 1
    assert len(sandbox_processes(pool)) == per_worker * len(pool.worker_uids), "a run left processes behind"


def assert_still_serving(pool: SandboxPool, restarts_before: int) -> None:
    result = run(pool, "print(6 * 7)")
    assert (result.status, result.stdout) == ("ok", "42\n")
    assert pool.health().worker_restarts == restarts_before, "the worker had to be restarted"


# ---------------------------------------------------------------------------------------------------
# Capabilities and ordinary programs
# ---------------------------------------------------------------------------------------------------


def test_capabilities_name_every_layer(isolation):
    capabilities = isolation.capabilities()
    assert capabilities.isolated and capabilities.mode in ("bwrap-privileged", "bwrap-userns")
    assert capabilities.bubblewrap.startswith("bubblewrap ")
    assert capabilities.seccomp
    assert "python" in capabilities.languages
    if capabilities.cgroup is not None:
        assert (capabilities.memory_limit_by, capabilities.process_limit_by) == ("cgroup", "cgroup")
    else:
        assert any(note.startswith("cgroups: off") for note in capabilities.notes)


def test_exit_status_stdin_and_tracebacks(pool):
    result = run(pool, "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 39")
    assert (result.status, result.exit_code, result.stdout, result.signal) == ("ok", 0, "42\n", None)
    assert result.cpu_time_s >= 0 and result.wall_time_s > 0

    result = run(pool, "import sys\nprint('partial')\nsys.exit(3)")
    assert (result.status, result.exit_code, result.stdout) == ("runtime_error", 3, "partial\n")

    result = run(pool, "def f():\n    return 1 / 0\nf()")
    assert (result.status, result.exit_code) == ("runtime_error", 1)
    assert result.stderr.startswith("Traceback (most recent call last):\n  File \"/tmp/main.py\", line 3")
    assert result.stderr.endswith("ZeroDivisionError: division by zero\n")

    result = run(pool, "print(")
    assert result.status == "runtime_error" and "SyntaxError" in result.stderr


def test_python_programs_behave_as_under_a_fresh_interpreter(pool):
    result = run(pool, """
        import atexit, sys, threading
        assert __name__ == "__main__" and sys.argv == ["main.py"]
        name = input()
        atexit.register(lambda: print("atexit ran"))
        threading.Thread(target=lambda: print("thread of", name)).start()
        exit(5)  # the site builtin
    """, stdin="ada\n")
    assert (result.status, result.exit_code) == ("runtime_error", 5)
    assert result.stdout == "thread of ada\natexit ran\n"

    result = run(pool, """
        import multiprocessing
        with multiprocessing.Pool(2) as workers:
            print(workers.map(abs, [-1, -2]))
    """)
    assert (result.status, result.stdout) == ("ok", "[1, 2]\n")


def test_each_run_starts_clean(pool):
    first = run(pool, """
        import os
        open("/tmp/left-behind", "w").write("x")
        open("/dev/shm/left-behind", "w").write("x")
        os.makedirs("/tmp/locked/inner")
        os.chmod("/tmp/locked", 0)
        os.environ["LEAK"] = "1"
        print(os.getcwd())
    """)
    assert (first.status, first.stdout) == ("ok", "/tmp\n")
    second = run(pool, """
        import os
        print(sorted(os.listdir("/tmp")), sorted(os.listdir("/dev/shm")))
        print(sorted(os.environ))
    """)
    assert second.status == "ok"
    assert second.stdout == "['main.py'] []\n['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n"


def test_concurrent_runs_use_every_worker(isolation):
    with SandboxPool(isolation, workers=2) as two:
        results = [None] * 6

        def submit(index):
            results[index] = two.run(RunRequest(program="import os, time\ntime.sleep(0.2)\nprint(os.getuid())"))

        threads = [threading.Thread(target=submit, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(result.status == "ok" for result in results)
        if isolation.per_worker_uid:
            assert {int(result.stdout) for result in results} == set(two.worker_uids)
        assert two.health().runs == 6


# ---------------------------------------------------------------------------------------------------
# Adversarial programs: each contained, with a clear verdict, and the worker keeps serving
# ---------------------------------------------------------------------------------------------------


def test_fork_bomb(pool):
    restarts = pool.health().worker_restarts
    result = run(pool, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout_s=2, max_processes=16)
    assert result.status == "timeout", result
    assert "timeout_s=2" in result.message
    if pool.isolation.process_limit_by == "cgroup":
        assert result.process_limit_hit is True
        assert "a fork failed at the limit of 16 processes" in result.message
    assert_only_zygotes_left(pool)
    assert_still_serving(pool, restarts)


def test_fork_bomb_under_rlimits(rlimit_pool):
    result = run(rlimit_pool, "import os\nwhile True:\n    os.fork()", timeout_s=2, max_processes=8)
    assert result.status == "runtime_error" and "BlockingIOError" in result.stderr, result
    assert result.process_limit_hit is None  # no pids cgroup to tell
    assert_only_zygotes_left(rlimit_pool)
    assert_still_serving(rlimit_pool, 0)


@pytest.mark.parametrize("fixture", ["pool", "rlimit_pool"])
def test_memory_bomb(fixture, request):
    target = request.getfixturevalue(fixture)
    restarts = target.health().worker_restarts
    result = run(target, """
        chunks = []
        while True:
            chunks.append(bytearray(8 << 20))
    """, memory_mb=128)
    assert result.status == "memory_limit", result
    assert result.message == "went past memory_mb=128"
    if target.isolation.capabilities().memory_limit_by == "cgroup":
        assert result.signal == "SIGKILL" and result.memory_peak_mb >= 128
    assert_only_zygotes_left(target)
    assert_still_serving(target, restarts)


def test_infinite_loop_hits_wall_and_cpu_limits(pool):
    restarts = pool.health().worker_restarts
    wall = run(pool, "while True:\n    pass", timeout_s=1)
    assert (wall.status, wall.signal) == ("timeout", "SIGKILL")
    assert 1.0 <= wall.wall_time_s < 3.0
    assert "timeout_s=1 (wall clock)" in wall.message

    sleeper = run(pool, "import time\ntime.sleep(60)", timeout_s=1)
    assert sleeper.status == "timeout" and sleeper.cpu_time_s < 0.5

    cpu = run(pool, "while True:\n    pass", timeout_s=30, cpu_time_s=1)
    assert (cpu.status, cpu.signal) == ("timeout", "SIGXCPU"), cpu
    assert cpu.cpu_time_s > 0.9 and "cpu_time_s=1" in cpu.message  # the kernel counts in ticks
    # Below a second the kernel cannot stop it, but the verdict holds the run to the exact limit.
    spin = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.4:\n    pass"
    over = run(pool, spin, cpu_time_s=0.2)
    assert (over.status, over.exit_code) == ("timeout", 0) and "more than cpu_time_s=0.2" in over.message
    assert run(pool, spin, cpu_time_s=0.9).status == "ok"
    assert_still_serving(pool, restarts)


def test_busy_child_that_outlives_its_parent(pool):
    restarts = pool.health().worker_restarts
    result = run(pool, """
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    pass
            os._exit(0)
        os.wait()
        print("parent exits")
    """)
    assert (result.status, result.stdout) == ("ok", "parent exits\n")
    assert_only_zygotes_left(pool)
    # Inside, the next run sees nothing but the zygote (PID 1) and itself.
    seen = run(pool, "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, os.getpid()])")
    assert seen.stdout == "True\n"
    assert_still_serving(pool, restarts)


@pytest.mark.parametrize("with_seccomp", [True, False], ids=["all-layers", "network-namespace-alone"])
def test_network_connect_is_contained(with_seccomp, pool):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    program = f"""
        import socket
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection(address, timeout=2)
                print("connected", address)
            except OSError as error:
                print("refused", address, error.errno)
    """
    try:
        if with_seccomp:
            result = run(pool, program)
        else:
            without_seccomp = _require_isolation(detect(use_seccomp=False, use_cgroups=False), seccomp=False)
            with SandboxPool(without_seccomp, workers=1) as plain:
                assert plain.isolation.seccomp_filter is None
                result = run(plain, program)
        assert result.status == "ok", result
        assert "connected" not in result.stdout and result.stdout.count("refused") == 2
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_writing_outside_scratch_fails(pool, tmp_path):
    host_file = tmp_path / "host-file.txt"
    host_file.write_text("original")
    targets = ["/usr/evil", "/evil", "/etc/evil", "/proc/sys/kernel/hostname", str(host_file), str(REPO / "evil")]
    result = run(pool, f"""
        import os
        for path in {targets!r}:
            try:
                with open(path, "w") as handle:
                    handle.write("pwned")
                print("WROTE", path)
            except OSError as error:
                print("denied", path, os.strerror(error.errno))
        os.makedirs("/tmp/allowed/dir")
        open("/tmp/allowed/dir/file", "w").write("scratch is writable")
    """)
    assert result.status == "ok", result
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["denied", path] for path in targets]
    assert host_file.read_text() == "original"
    assert not Path("/usr/evil").exists() and not Path("/evil").exists() and not (REPO / "evil").exists()


def test_host_secrets_are_invisible(tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("s3cret-file")
    secret_file.chmod(0o600)
    os.environ["MEGATRON_RL_TEST_SECRET"] = "s3cret-env"
    try:
        with SandboxPool(_require_isolation(detect()), workers=1) as fresh:
            result = run(fresh, f"""
                import os
                print(sorted(os.environ))
                for path in [{str(secret_file)!r}, "/etc/shadow", "/proc/1/environ", "/root/.bashrc",
                             {str(REPO / "setup.py")!r}]:
                    try:
                        print("READ", path, open(path).read()[:20])
                    except OSError as error:
                        print("hidden", path, os.strerror(error.errno))
                print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
            """)
    finally:
        del os.environ["MEGATRON_RL_TEST_SECRET"]
    assert result.status == "ok", result
    assert "s3cret" not in result.stdout and "READ" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"
    assert len(json.loads(lines[-1])) == 2  # the zygote (PID 1) and the run: no host process is visible


def test_huge_output_is_cut_at_the_limit(pool):
    restarts = pool.health().worker_restarts
    result = run(pool, "while True:\n    print('x' * 1000)", max_output_bytes=100_000)
    assert (result.status, result.stdout_truncated) == ("output_limit", True)
    assert len(result.stdout) == 100_000 and set(result.stdout) <= {"x", "\n"}
    assert "max_output_bytes=100000" in result.message
    assert_still_serving(pool, restarts)


def test_killing_the_sandbox_parent_fails(pool):
    restarts = pool.health().worker_restarts
    result = run(pool, """
        import ctypes, os, signal
        parent = os.getppid()
        for number in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):
            os.kill(parent, number)
        libc = ctypes.CDLL(None, use_errno=True)
        print("ptrace", libc.ptrace(16, parent, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH
        print("parent", parent, "still here")
    """)
    assert result.status == "ok", result
    assert result.stdout == "ptrace -1 1\nparent 1 still here\n"  # EPERM
    suicide = run(pool, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (suicide.status, suicide.signal, suicide.message) == ("killed", "SIGKILL", "ended by SIGKILL")
    assert_still_serving(pool, restarts)


def test_seccomp_denies_kernel_surfaces(pool):
    result = run(pool, """
        import ctypes, socket
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(name, value):
            print(name, value, ctypes.get_errno())
        attempt("unshare", libc.unshare(0x10000000))              # CLONE_NEWUSER
        attempt("shmget", libc.shmget(0, 4096, 0o1000 | 0o600))   # IPC_CREAT
        attempt("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as error:
            print("socket", error.errno)
        a, b = socket.socketpair()  # Unix sockets stay allowed
        a.send(b"ok")
        print(b.recv(2).decode())
    """)
    assert result.stdout == "unshare -1 1\nshmget -1 1\nmount -1 1\nsocket 97\nok\n", result


def test_a_lost_worker_is_replaced(isolation):
    with SandboxPool(isolation, workers=1) as single:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run(single, "import time\ntime.sleep(30)")))
        thread.start()
        deadline = time.monotonic() + 10
        while len(sandbox_processes(single)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in sandbox_processes(single):  # from the host: the zygote and the run
            os.kill(pid, signal.SIGKILL)
        thread.join(20)
        assert outcome["result"].status == "killed"
        assert "worker was lost" in outcome["result"].message
        assert single.health().worker_restarts == 1
        assert run(single, "print('back')").stdout == "back\n"


def test_scratch_space_is_capped(isolation):
    small = dataclasses.replace(isolation, scratch_bytes=1 << 20)
    with SandboxPool(small, workers=1) as tiny:
        result = run(tiny, "open('/tmp/big', 'wb').write(b'x' * (2 << 20))")
    assert result.status == "runtime_error" and "No space left on device" in result.stderr


def test_cpp_programs(pool):
    if "cpp" not in pool.isolation.capabilities().languages:
        pytest.skip("no g++ on this machine (apt-get install g++): C++ is optional")
    ok = pool.run(RunRequest(language="cpp", stdin="20 22", program=textwrap.dedent("""
        #include <iostream>
        int main() { long a, b; std::cin >> a >> b; std::cout << a + b << std::endl; }
    """)))
    assert (ok.status, ok.stdout) == ("ok", "42\n")
    broken = pool.run(RunRequest(language="cpp", program="int main() { return undefined_name; }"))
    assert broken.status == "compile_error" and "undefined_name" in broken.stderr
    crash = pool.run(RunRequest(language="cpp", program="int main() { volatile int *p = nullptr; return *p; }"))
    assert (crash.status, crash.signal) == ("runtime_error", "SIGSEGV")
    leftovers = run(pool, "import os\nprint(os.listdir('/tmp'))")
    assert leftovers.stdout == "['main.py']\n"  # its own file: no main.cpp, no binary


# ---------------------------------------------------------------------------------------------------
# Other isolation modes
# ---------------------------------------------------------------------------------------------------


def world_readable_python() -> str:
    """An interpreter that the per-worker uids can read (the project's may sit under a 0700 /root)."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs /usr/bin/python3, which a worker uid outside bubblewrap can read")
    return "/usr/bin/python3"


def test_without_bubblewrap_the_pool_refuses_unless_allowed():
    missing = detect(bwrap="/nonexistent/bwrap", use_cgroups=False, python=world_readable_python())
    assert missing.mode == "none" and not missing.isolated
    assert any("bubblewrap" in note for note in missing.notes)
    with pytest.raises(UserError, match="--allow-unisolated"):
        SandboxPool(missing, workers=1)
    with SandboxPool(missing, workers=1, allow_unisolated=True) as unisolated:
        result = run(unisolated, """
            import os
            if os.fork() == 0:
                os.setsid()
                while True:
                    pass
            print("ran")
        """)
        assert (result.status, result.stdout) == ("ok", "ran\n")
        if unisolated.isolation.per_worker_uid:
            assert_only_zygotes_left(unisolated)


def test_user_namespace_mode():
    isolation = detect(python=world_readable_python(), modes=("bwrap-userns",))
    assert isolation.mode == "bwrap-userns", isolation.notes
    with SandboxPool(isolation, workers=1) as userns:
        result = run(userns, "import os\nprint(sorted(os.environ))\nwhile True:\n    os.fork()", max_processes=8)
        assert result.status == "runtime_error" and "BlockingIOError" in result.stderr
        assert_only_zygotes_left(userns)


# ---------------------------------------------------------------------------------------------------
# HTTP service and CLI
# ---------------------------------------------------------------------------------------------------


def start_server(**environment: str) -> tuple[subprocess.Popen, SandboxClient]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_rl.reward.sandbox.server", "--port", str(port), "--workers", "2"],
        cwd=REPO, env=dict(os.environ, **environment), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = SandboxClient(f"127.0.0.1:{port}", timeout=10)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.health()
            return process, client
        except SandboxUnreachable:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the sandbox server did not start: {process.communicate()[0]}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server():
    process, client = start_server(MEGATRON_RL_TEST_SECRET="s3cret-env")
    yield process, client
    process.kill()
    process.wait()


def test_http_run_health_and_capabilities(server):
    _, client = server
    assert client.capabilities().isolated
    result = client.run(RunRequest(program="import os\nprint(input()[::-1], sorted(os.environ))", stdin="olleh"))
    assert (result.status, result.stdout) == ("ok", "hello ['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']\n")
    bomb = client.run(RunRequest(program="x = bytearray(1 << 30)\nx[::4096] = b'1' * len(x[::4096])", memory_mb=64))
    assert bomb.status == "memory_limit"
    health = client.health()
    assert (health.status, health.workers, health.runs, health.worker_restarts) == ("ok", 2, 2, 0)


@pytest.mark.parametrize("body, message", [
    ({"program": "pass", "timeout_s": 0}, "timeout_s: Input should be greater than 0"),
    ({"program": "pass", "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ({"stdin": ""}, "program: Field required"),
    ("not json", "request: Invalid JSON"),
])
def test_http_rejects_bad_requests_naming_the_field(server, body, message):
    _, client = server
    connection = http.client.HTTPConnection(client.base_url.removeprefix("http://"), timeout=10)
    connection.request("POST", "/run", body=body if isinstance(body, str) else json.dumps(body))
    response = connection.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"]["message"].startswith(message)
    connection.close()


def test_http_client_names_an_unreachable_server():
    with pytest.raises(SandboxUnreachable, match="is it running"):
        SandboxClient(f"127.0.0.1:{free_port()}").health()


def test_server_stops_cleanly_on_sigterm(isolation):
    process, client = start_server()
    assert client.run(RunRequest(program="print(1)")).status == "ok"
    workers = descendants(process.pid)
    assert len(workers) >= 4  # two bwraps and their zygotes
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "workers outlived the server"
    for parent in isolation.cgroup_parents.values():
        assert not list(parent.glob(f"megatron-rl-sandbox-{process.pid}-*")), "cgroups left behind"


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sandbox", *argv])
    return args.handler(args)


def test_cli_run_prints_one_verdict(tmp_path, capsys):
    program = tmp_path / "double.py"
    program.write_text("print(2 * int(input()))")
    stdin = tmp_path / "in.txt"
    stdin.write_text("21\n")
    assert _cli("run", str(program), "--stdin", str(stdin), "--timeout", "5", "--memory-mb", "128") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert (verdict["status"], verdict["stdout"], verdict["exit_code"]) == ("ok", "42\n", 0)

    program.write_text("while True:\n    pass")
    assert _cli("run", str(program), "--timeout", "0.5") == 1
    assert json.loads(capsys.readouterr().out)["status"] == "timeout"

    assert _cli("capabilities") == 0
    assert json.loads(capsys.readouterr().out)["isolated"] is True


def test_cli_errors_name_the_flag(tmp_path):
    program = tmp_path / "p.py"
    program.write_text("pass")
    with pytest.raises(UserError, match="--timeout: Input should be greater than 0"):
        _cli("run", str(program), "--timeout", "0")
    with pytest.raises(UserError, match="PROGRAM .*missing.py: cannot read"):
        _cli("run", str(tmp_path / "missing.py"))
    (tmp_path / "p.rb").write_text("puts 1")
    with pytest.raises(UserError, match="pass --language"):
        _cli("run", str(tmp_path / "p.rb"))
