"""Getting a written weight version (disk path) to every pod's engine: k1.5's per-node delivery.

The trainer leaves a copy in each node's shared memory holding the pipeline stages trained there
(write_hf_model). A pod's engine loads the copy on its own node; what that copy lacks (stages trained on
other nodes, everything on a node without trainer ranks) its sidecar first fetches from the sidecars of
nodes that have it, over their control API (GET /v1/weight-files/..., token-authenticated): k1.5 moved these
shards with Mooncake over RDMA, this moves them over HTTP. When every node trains every stage (data
parallelism over nodes), nothing crosses the network.

- `plan_delivery` (the driver): for one engine, the directory it loads and the `WeightSource`s to fetch
  from, spread over the sidecars that hold each file;
- `fetch_weight_files` (the loading sidecar): fetch them, each file whole or not at all;
- `served_weight_file` (the serving sidecar): the file a request names, only inside its shared memory.
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_rl.errors import RunError
from megatron_rl.hybrid.sidecar_protocol import (
    SidecarError, SidecarNotFound, SidecarRequestError, SidecarStatus, SidecarUnavailable, WeightSource,
)
from megatron_rl.hybrid.weight_sync import SHM_DIRECTORY_PREFIX, SyncedWeights

logger = logging.getLogger(__name__)

FETCH_STREAMS = 4  # files fetched at once: one HTTP stream rarely fills a node's network
_RUN_DIRECTORY = re.compile(re.escape(SHM_DIRECTORY_PREFIX) + r"[0-9a-f]{12}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def plan_delivery(weights: SyncedWeights, engine: SidecarStatus,
                  servers: list[SidecarStatus]) -> tuple[str, list[WeightSource]]:
    """Where the engine behind `engine` loads `weights` from, and what its sidecar must fetch there first
    from `servers` (the run's sidecars that serve weight files). An engine without a sidecar (no host)
    reads the trainer's own copy, and so does one given a directory written without copies' records."""
    if engine.host is None or engine.shm_dir is None or weights.shm_name is None:
        return str(weights.path), []
    path = Path(engine.shm_dir) / weights.shm_name
    wanted = {name: size for copy in weights.directories for name, size in copy.files.items()}
    local = [copy for copy in weights.directories if copy.host == engine.host and Path(copy.path) == path]
    missing = [name for name in wanted if not any(name in copy.files for copy in local)]
    by_server: dict[str, dict[str, int]] = {}
    for number, name in enumerate(missing):
        holders = [server for server in servers for copy in weights.directories
                   if name in copy.files and (server.host, Path(server.shm_dir) / weights.shm_name) ==
                   (copy.host, Path(copy.path))]
        if not holders:
            where = ", ".join(sorted({copy.host for copy in weights.directories if name in copy.files}))
            raise RunError(f"{engine.pod_name}'s engine (on {engine.host}) needs {name} of weight version "
                           f"{weights.weight_version}, which was written only on {where}, where no sidecar of the "
                           "run serves weight files; run `megatron-rl sidecar` on that node, reachable from the "
                           "others (hybrid.peer_sidecar_urls and hybrid.advertise_host), or use "
                           "hybrid.weight_sync=nccl")
        server = holders[number % len(holders)]  # spread the fetch over the nodes that hold the file
        by_server.setdefault(server.control_url, {})[name] = wanted[name]
    return str(path), [WeightSource(sidecar_url=url, directory=weights.shm_name, files=files)
                       for url, files in by_server.items()]


def fetch_weight_files(directory: Path, sources: list[WeightSource], token: str | None, timeout: float) -> int:
    """Fetch into `directory` the files of `sources` it does not already hold at their size; returns the
    bytes fetched. A file is written under a temporary name and renamed once whole and of its size, so an
    interrupted fetch leaves nothing a load could mistake for weights."""
    from megatron_rl.hybrid.sidecar_client import SidecarClient

    directory.mkdir(parents=True, exist_ok=True)
    work = [(source, name, size) for source in sources for name, size in source.files.items()
            if not ((directory / name).is_file() and (directory / name).stat().st_size == size)]

    def fetch(item: tuple[WeightSource, str, int]) -> int:
        source, name, size = item
        partial = directory / f".{name}.part"
        try:
            SidecarClient(source.sidecar_url, token, timeout).download(
                f"/v1/weight-files/{source.directory}/{name}", partial)
            if partial.stat().st_size != size:
                raise SidecarUnavailable(f"fetching {name} from the sidecar at {source.sidecar_url} gave "
                                         f"{partial.stat().st_size} bytes, not the {size} registered")
            os.replace(partial, directory / name)
        except SidecarError as error:
            raise SidecarUnavailable(f"fetching weight file {name} from the sidecar at {source.sidecar_url} "
                                     f"failed: {error}") from None
        finally:
            partial.unlink(missing_ok=True)
        return size

    started = time.monotonic()
    with ThreadPoolExecutor(max(1, min(FETCH_STREAMS, len(work)))) as pool:
        fetched = sum(pool.map(fetch, work))
    if work:
        seconds = time.monotonic() - started
        logger.info("fetched %d weight files (%.1f MB) into %s from %d sidecar(s) in %.2f s (%.2f GB/s)", len(work),
                    fetched / 1e6, directory, len(sources), seconds, fetched / max(seconds, 1e-9) / 1e9)
    return fetched


def served_weight_file(shm_dir: str | None, run_directory: str, version_directory: str, name: str) -> Path:
    """The file GET /v1/weight-files/RUN/VERSION/NAME names, checked to be a weight file in `shm_dir`."""
    if shm_dir is None:
        raise SidecarNotFound("this sidecar serves no weight files: it has no hybrid.shm_dir")
    if not (_RUN_DIRECTORY.fullmatch(run_directory) and version_directory.startswith("v")
            and _PLAIN_NAME.fullmatch(version_directory[1:]) and _PLAIN_NAME.fullmatch(name)):
        raise SidecarRequestError(f"weight file {run_directory}/{version_directory}/{name}: not a weight file's "
                                  f"name; ask for {SHM_DIRECTORY_PREFIX}<run key>/v<version>/<file>, as "
                                  "LoadWeightsBody.sources gives them")
    path = Path(shm_dir) / run_directory / version_directory / name
    if not path.is_file():
        raise SidecarNotFound(f"weight file {run_directory}/{version_directory}/{name} is not in this sidecar's "
                              f"shared memory ({shm_dir}); the version may be gone already (a newer one loaded)")
    return path
