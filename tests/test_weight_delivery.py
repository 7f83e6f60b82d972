"""Per-node weight copies (disk path): what each node's shared memory gets, and the fetch between sidecars."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from megatron_rl.errors import RunError
from megatron_rl.hf_checkpoint import SafetensorsReader, read_hf_config
from megatron_rl.hybrid.sidecar import Sidecar
from megatron_rl.hybrid.sidecar_client import SidecarClient
from megatron_rl.hybrid.sidecar_protocol import (
    SidecarAuthError, SidecarNotFound, SidecarRequestError, SidecarStatus, SidecarUnavailable, WeightSource, utc_now,
)
from megatron_rl.hybrid.sidecar_server import serving_in_thread
from megatron_rl.hybrid.weight_delivery import fetch_weight_files, plan_delivery
from megatron_rl.hybrid.weight_sync import SyncedWeights
from megatron_rl.train import parallel
from megatron_rl.train.convert import load_hf_weights
from megatron_rl.train.convert_commands import write_hf_model
from megatron_rl.train.model import architecture_from_hf_config, build_gpt_model

VERSION_DIRECTORY = "megatron-rl-weights-0123456789ab/v1"  # as DiskWeightSync names a version below shm_dir
TOKEN = "the-pods-token"


def _write_on_every_rank(hf_dir: Path, root: Path, tp: int, pp: int, nodes: int):
    """Rank r writes into node (r mod nodes)'s shared memory, as on `nodes` machines."""
    with parallel.model_parallel(tp, pp):
        arch = architecture_from_hf_config(read_hf_config(hf_dir))
        model = build_gpt_model(arch)
        load_hf_weights(model, SafetensorsReader(hf_dir), arch)
        out = root / f"shm{dist.get_rank() % nodes}" / VERSION_DIRECTORY
        return write_hf_model(model, arch, out, hf_dir, bucket_bytes=2**16)


def _tensors(directory: Path, files) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(directory / name), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _status(pod: str, shm_dir: Path | None, url: str | None, host: str | None = None) -> SidecarStatus:
    return SidecarStatus(pod_name=pod, engine="embedded", state="ready", engine_url="http://127.0.0.1:1",
                         updated_at=utc_now(), host=host or socket.gethostname(),
                         shm_dir=str(shm_dir) if shm_dir else None, control_url=url)


def _synced(written, root: Path) -> SyncedWeights:
    return SyncedWeights("1", root / "shm0" / VERSION_DIRECTORY, written.bytes, 0.0, directories=written.directories,
                         shm_name=VERSION_DIRECTORY)


@pytest.fixture(scope="module")
def written_copies(tiny_models, tmp_path_factory):
    """The same tiny model written three ways: one node; two nodes with a data-parallel replica each; two
    nodes with a pipeline stage each."""
    root = tmp_path_factory.mktemp("copies")
    layouts = {"one node": (1, 1, 1, 1), "replica per node": (2, 1, 1, 2), "stage per node": (2, 1, 2, 2)}
    return {name: (root / name, parallel.launch(_write_on_every_rank, ranks, tiny_models["llama"], root / name, tp, pp,
                                                nodes)[0])
            for name, (ranks, tp, pp, nodes) in layouts.items()}


def test_each_node_gets_a_copy_of_the_stages_trained_there(written_copies, tiny_models):
    single_root, single = written_copies["one node"]
    reference = _tensors(single_root / "shm0" / VERSION_DIRECTORY, single.directories[0].files)
    metadata = {"config.json", "model.safetensors.index.json"}
    assert len(single.directories) == 1 and metadata <= set(single.directories[0].files)

    root, replicas = written_copies["replica per node"]
    assert sorted(Path(copy.path).parts[-3] for copy in replicas.directories) == ["shm0", "shm1"]
    assert replicas.bytes == single.bytes  # the model's tensors once, not once per copy
    for copy in replicas.directories:  # data-parallel replicas on both nodes: every copy is whole, nothing to fetch
        assert copy.files == single.directories[0].files
        tensors = _tensors(Path(copy.path), copy.files)
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)

    root, stages = written_copies["stage per node"]
    by_node = {Path(copy.path).parts[-3]: copy for copy in stages.directories}
    assert {name for name in by_node["shm0"].files if name.endswith(".safetensors")} and all(
        "stage000" in name for name in by_node["shm0"].files if name.endswith(".safetensors"))
    assert all("stage001" in name for name in by_node["shm1"].files if name.endswith(".safetensors"))
    for copy in by_node.values():  # each has the index of the whole model, and only its stage's shards
        assert metadata <= set(copy.files)
        assert sorted(p.name for p in Path(copy.path).iterdir()) == sorted(copy.files)
    merged = {**_tensors(Path(by_node["shm0"].path), by_node["shm0"].files),
              **_tensors(Path(by_node["shm1"].path), by_node["shm1"].files)}
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in reference)


def test_a_plan_fetches_only_what_the_engines_node_lacks_and_spreads_it_over_the_holders(written_copies, tmp_path):
    root, stages = written_copies["stage per node"]
    weights = _synced(stages, root)
    servers = [_status(f"pod-{node}", root / f"shm{node}", f"http://pod-{node}:31000") for node in (0, 1)]
    by_node = {Path(copy.path).parts[-3]: copy for copy in stages.directories}

    path, sources = plan_delivery(weights, servers[1], servers)
    assert path == str(root / "shm1" / VERSION_DIRECTORY)  # its own node's copy, completed by the other stage
    assert [(s.sidecar_url, s.directory) for s in sources] == [("http://pod-0:31000", VERSION_DIRECTORY)]
    assert set(sources[0].files) == set(by_node["shm0"].files) - set(by_node["shm1"].files)

    _, replicas = written_copies["replica per node"]
    weights = _synced(replicas, written_copies["replica per node"][0])
    replica_servers = [_status(f"pod-{n}", written_copies["replica per node"][0] / f"shm{n}", f"http://pod-{n}:31000")
                       for n in (0, 1)]
    assert plan_delivery(weights, replica_servers[0], replica_servers)[1] == []  # a whole copy on its node
    newcomer = _status("pod-2", tmp_path / "shm2", None)  # a node no trainer rank writes on
    path, sources = plan_delivery(weights, newcomer, replica_servers)
    assert path == str(tmp_path / "shm2" / VERSION_DIRECTORY)
    assert {s.sidecar_url for s in sources} == {"http://pod-0:31000", "http://pod-1:31000"}  # both nodes serve it
    fetched = [name for source in sources for name in source.files]
    assert sorted(fetched) == sorted(replicas.directories[0].files)  # every file once

    bare = _status("external", None, None).model_copy(update={"host": None})
    assert plan_delivery(weights, bare, replica_servers) == (str(weights.path), [])  # no sidecar: the trainer's copy


def test_a_file_no_sidecar_serves_is_a_clear_error(written_copies, tmp_path):
    root, stages = written_copies["stage per node"]
    servers = [_status("pod-1", root / "shm1", "http://pod-1:31000")]  # pod-0's sidecar does not answer
    with pytest.raises(RunError, match=r"pod-1's engine .* needs model-stage000-\d+.safetensors of weight version "
                                       r"1, which was written only on .*, where no sidecar of the run serves weight "
                                       r"files"):
        plan_delivery(_synced(stages, root), servers[0], servers)


@pytest.fixture
def serving_sidecar(written_copies):
    """pod-0's sidecar on HTTP (no engine needed to serve files), over node shm0 of the pipeline layout."""
    root, _ = written_copies["stage per node"]
    sidecar = Sidecar(lambda port: None, pod_name="pod-0", engine_kind="embedded", shm_dir=str(root / "shm0"))
    with serving_in_thread(sidecar, TOKEN) as url:
        yield url


def test_a_sidecar_fetches_another_nodes_stage_whole_and_keeps_what_it_has(written_copies, serving_sidecar, tmp_path):
    root, stages = written_copies["stage per node"]
    by_node = {Path(copy.path).parts[-3]: copy for copy in stages.directories}
    target = tmp_path / "shm1" / VERSION_DIRECTORY
    target.mkdir(parents=True)
    (target / "config.json").write_bytes((root / "shm0" / VERSION_DIRECTORY / "config.json").read_bytes())
    before = (target / "config.json").stat().st_mtime_ns
    source = WeightSource(sidecar_url=serving_sidecar, directory=VERSION_DIRECTORY, files=by_node["shm0"].files)

    fetched = fetch_weight_files(target, [source], TOKEN, timeout=30)

    assert fetched == sum(size for name, size in by_node["shm0"].files.items() if name != "config.json")
    assert (target / "config.json").stat().st_mtime_ns == before  # already there at its size: not fetched again
    for name in by_node["shm0"].files:
        assert (target / name).read_bytes() == (root / "shm0" / VERSION_DIRECTORY / name).read_bytes()
    assert not list(target.glob(".*.part"))


def test_the_file_server_refuses_strangers_other_paths_and_gone_files(written_copies, serving_sidecar, tmp_path):
    client = SidecarClient(serving_sidecar, TOKEN, timeout=10)
    with pytest.raises(SidecarAuthError, match="bearer token"):
        SidecarClient(serving_sidecar, "wrong", timeout=10).download(
            f"/v1/weight-files/{VERSION_DIRECTORY}/config.json", tmp_path / "x")
    for bad in ("etc/v1/passwd", "megatron-rl-weights-0123456789ab/v1/.hidden",
                "megatron-rl-weights-0123456789ab/x/config.json"):
        with pytest.raises(SidecarRequestError, match="not a weight file's name"):
            client.download(f"/v1/weight-files/{bad}", tmp_path / "x")
    with pytest.raises(SidecarNotFound, match=r"not in this sidecar's shared memory .*\(a newer one loaded\)"):
        client.download(f"/v1/weight-files/{VERSION_DIRECTORY}/model-stage009-00000.safetensors", tmp_path / "x")

    # A fetch that fails (a file gone, a size that does not match) names the file and source, writes nothing.
    target = tmp_path / "shm1" / VERSION_DIRECTORY
    gone = WeightSource(sidecar_url=serving_sidecar, directory=VERSION_DIRECTORY, files={"missing.safetensors": 10})
    with pytest.raises(SidecarUnavailable, match=r"fetching weight file missing.safetensors from the sidecar at "
                                                 rf"{serving_sidecar} failed: .*HTTP 404"):
        fetch_weight_files(target, [gone], TOKEN, timeout=10)
    size = (written_copies["stage per node"][0] / "shm0" / VERSION_DIRECTORY / "config.json").stat().st_size
    wrong = WeightSource(sidecar_url=serving_sidecar, directory=VERSION_DIRECTORY, files={"config.json": size + 1})
    with pytest.raises(SidecarUnavailable, match=f"gave {size} bytes, not the {size + 1} registered"):
        fetch_weight_files(target, [wrong], TOKEN, timeout=10)
    assert list(target.iterdir()) == []
