"""Sandbox start latency and launch rate (targets: median start ≤ 0.02 s, ≥ 30 launches/s on 2 cores).

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 200] [--seconds 10] [--workers N] [--clients 4]

Start latency is the time from handing a run to the sandbox to the first line of the program running
(the program prints `time.time()` first; the sandbox shares the host's clock). End-to-end is the time
until the verdict is back. Launches/s is sustained with `--clients` threads submitting a trivial
program for `--seconds`. The cold rows show what the pre-warmed pool saves: a fresh bubblewrap
sandbox, a fresh interpreter, and both with the zygote's hand-shake.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rl.net import free_port  # noqa: E402
from megatron_rl.reward.sandbox import RunRequest, SandboxClient, SandboxPool, SandboxUnreachable, detect  # noqa: E402
from megatron_rl.reward.sandbox import zygote  # noqa: E402
from megatron_rl.reward.sandbox.isolation import allocate_uid_block  # noqa: E402

STAMP_PROGRAM = "import time\nprint(repr(time.time()))"
TRIVIAL_PROGRAM = "pass"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(command: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def cold_worker_starts(isolation, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        process = isolation.spawn_worker(allocate_uid_block() if isolation.per_worker_uid else None)
        assert zygote.read_frame(process.stdout.fileno(), time.monotonic() + 30) == {"ready": True}
        times.append(time.perf_counter() - started)
        process.stdin.close()
        process.wait()
        process.stdout.close()
    return times


def start_latencies(run, runs: int) -> tuple[list[float], list[float]]:
    """(start, end-to-end) seconds for `runs` sequential runs of STAMP_PROGRAM through `run`."""
    starts, totals = [], []
    for _ in range(runs):
        submitted = time.time()
        result = run(RunRequest(program=STAMP_PROGRAM))
        finished = time.time()
        assert result.status == "ok", result
        starts.append(float(result.stdout) - submitted)
        totals.append(finished - submitted)
    return starts, totals


def launches_per_second(make_run, clients: int, seconds: float) -> float:
    counts = [0] * clients
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        run = make_run()
        while time.monotonic() < deadline:
            assert run(RunRequest(program=TRIVIAL_PROGRAM)).status == "ok"
            counts[index] += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "megatron_rl.reward.sandbox.server", "--port", str(port),
                                "--workers", str(workers)], cwd=Path(__file__).resolve().parents[1])
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            SandboxClient(url).health()
            return process, url
        except SandboxUnreachable:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the sandbox server did not start")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="sequential runs for the latency rows")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each launch-rate row")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pool size (default: CPU cores)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent submitters for launches/s")
    parser.add_argument("--cold-repeats", type=int, default=20)
    args = parser.parse_args()

    isolation = detect()
    capabilities = isolation.capabilities()
    print(f"isolation: {capabilities.mode}, seccomp {'on' if capabilities.seccomp else 'off'}, "
          f"cgroup {capabilities.cgroup or 'off'}; {os.cpu_count()} cores; {args.workers} workers")
    rows: list[tuple[str, str, str]] = []

    bwrap_true = [isolation.bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--tmpfs", "/tmp",
                  "--proc", "/proc", "--dev", "/dev", "/bin/true"]
    for name, command in [("cold: bwrap /bin/true (no interpreter)", bwrap_true),
                          ("cold: python -I -c pass (no sandbox)", [isolation.python, "-I", "-c", "pass"])]:
        times = timed(command, args.cold_repeats)
        rows.append((name, f"{statistics.median(times):.4f}", f"{percentile(times, 0.9):.4f}"))
    times = cold_worker_starts(isolation, args.cold_repeats)
    rows.append(("cold: worker start (sandbox + interpreter + zygote)", f"{statistics.median(times):.4f}",
                 f"{percentile(times, 0.9):.4f}"))

    with SandboxPool(isolation, workers=args.workers) as pool:
        start_latencies(pool.run, 10)  # warm-up
        starts, totals = start_latencies(pool.run, args.runs)
        rows.append(("pool: start latency (in process)", f"{statistics.median(starts):.4f}",
                     f"{percentile(starts, 0.9):.4f}"))
        rows.append(("pool: end-to-end verdict (in process)", f"{statistics.median(totals):.4f}",
                     f"{percentile(totals, 0.9):.4f}"))
        rate_in_process = launches_per_second(lambda: pool.run, args.clients, args.seconds)

    process, url = start_server(args.workers)
    try:
        client = SandboxClient(url)
        start_latencies(client.run, 10)
        starts, totals = start_latencies(client.run, args.runs)
        rows.append(("HTTP: start latency", f"{statistics.median(starts):.4f}", f"{percentile(starts, 0.9):.4f}"))
        rows.append(("HTTP: end-to-end verdict", f"{statistics.median(totals):.4f}", f"{percentile(totals, 0.9):.4f}"))
        rate_http = launches_per_second(lambda: SandboxClient(url).run, args.clients, args.seconds)
    finally:
        process.terminate()
        process.wait()

    width = max(len(row[0]) for row in rows)
    print(f"\n{'':{width}}  median s   p90 s")
    for name, median, p90 in rows:
        print(f"{name:{width}}  {median:>8}  {p90:>6}")
    print(f"\nsustained launches/s, {args.clients} clients, {args.seconds:g} s: in process {rate_in_process:.0f}, "
          f"over HTTP {rate_http:.0f}  (target ≥ 30; k1.5: 120 on 16 cores)")


if __name__ == "__main__":
    main()
