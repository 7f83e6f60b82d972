"""The Helm chart (deploy/helm/megatron-rl), rendered by Helm itself offline (helm-python-sdk: the Helm v4
Go SDK in-process) for its default values and the multi-node 128k example, among others. Every object
validates against the Kubernetes schemas, and the pods are wired as megatron-rl reads them
(k8s_invariants.py). Bad values fail with the schema's or the chart's message.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import helm_python as helm
import pytest
import yaml

import k8s_invariants as k8s
from megatron_rl.config import Config, load_config
from megatron_rl.control.operations import RunControl, RunStatus

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "megatron-rl"
EXAMPLE = CHART / "examples" / "multinode-128k.yaml"
RENDER_TOOL = REPO / "deploy" / "tools" / "render_chart.py"
NAMESPACE = "rl"

_spec = importlib.util.spec_from_file_location("render_chart", RENDER_TOOL)
render_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_chart)

SCENARIOS = {
    "default": [],
    "multinode-128k": [EXAMPLE],
    # two nodes on k1.5's weight path: each pod's sidecar fetches what its node's copy lacks from the others'
    "multinode-disk": {"nodes": 2, "checkpoints": {"accessModes": ["ReadWriteMany"]}},
    "device-plugin": {"gpu": {"mode": "devicePlugin"}},
    "sandbox-privileged": {"sandbox": {"enabled": True}},
    "sandbox-userns-external-etcd": {"sandbox": {"enabled": True, "isolation": "userns"},
                                     "etcd": {"enabled": False, "externalEndpoints": ["http://etcd.infra.svc:2379"]}},
}


def values_of(scenario: str) -> dict:
    given = SCENARIOS[scenario]
    return render_chart.merged_values([str(f) for f in given]) if isinstance(given, list) else given


def render(values: dict) -> k8s.Manifests:
    rendered = render_chart.render(values, name="exp", namespace=NAMESPACE)
    objects = [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
               for doc in yaml.safe_load_all(text) if doc]
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    return k8s.Manifests(objects, NAMESPACE, notes)


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request):
    return request.param, render(values_of(request.param))


def test_every_rendered_object_validates_against_the_kubernetes_schemas(scenario):
    name, manifests = scenario
    kinds = {o["kind"] for o in manifests.objects}
    assert {"Job", "ConfigMap", "Service", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    assert ("ResourceClaimTemplate" in kinds) == (name != "device-plugin")
    assert ("StatefulSet" in kinds) == (name != "sandbox-userns-external-etcd")
    assert ("Deployment" in kinds) == name.startswith("sandbox")
    k8s.check_schemas(manifests)


def test_helm_lint_finds_nothing_to_warn_about():
    for scenario in ("default", "multinode-128k"):
        report = helm.lint(str(CHART), values_of(scenario), strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] > 1] == []  # 1: INFO (e.g. no icon)


def test_the_config_map_carries_a_run_config_megatron_rl_accepts(scenario, tmp_path):
    name, manifests = scenario
    values = values_of(name)
    config = k8s.check_run_config(manifests, tmp_path)
    model = {"hf_path": "hfPath", "dtype": "dtype", "max_sequence_length": "maxSequenceLength"}
    merged = helm.Chart.load(str(CHART)).merge_values(values)
    assert {k: getattr(config.model, k) for k in model} == {k: merged["model"][v] for k, v in model.items()}
    assert config.parallel.model_dump() == merged["parallel"]
    if name == "multinode-128k":  # the example's own settings reach the run, with the chart's on top
        assert config.model.max_sequence_length == 131072 and config.parallel.tp == 8
        assert config.rollout.partial.segment_token_budget == 16384
        assert config.rollout.sglang_args[:4] == ["--tp-size", "4", "--dp-size", "2"]
        assert "--context-length" in config.rollout.sglang_args


def test_both_containers_see_all_the_pods_gpus(scenario, tmp_path):
    name, manifests = scenario
    gpus = k8s.check_gpus_shared(manifests, tmp_path)
    assert gpus == helm.Chart.load(str(CHART)).merge_values(values_of(name))["gpusPerPod"]


def test_dev_shm_is_memory_backed_and_shared_by_both_containers(scenario, tmp_path):
    k8s.check_shared_memory(scenario[1], tmp_path)


def test_rendezvous_matches_the_jobs_pods(scenario, tmp_path):
    name, manifests = scenario
    k8s.check_rendezvous(manifests, tmp_path)
    assert manifests.job["spec"]["completions"] == {"multinode-128k": 4, "multinode-disk": 2}.get(name, 1)


def test_ports_and_endpoints_match_the_config(scenario, tmp_path):
    name, manifests = scenario
    k8s.check_ports(manifests, tmp_path)
    k8s.check_reach(manifests, tmp_path)
    config = k8s.run_config(manifests, k8s.PodView(manifests, 0), tmp_path)
    if name == "sandbox-userns-external-etcd":
        assert config.control.etcd_endpoints == ["http://etcd.infra.svc:2379"]
    # Code rewards reach the chart's sandbox through its Service, or no sandbox is configured.
    sandboxes = [s for s in manifests.all("Service") if s["metadata"]["name"].endswith("-sandbox")]
    if sandboxes:
        url = urlparse(config.reward.sandbox_url)
        assert url.hostname == sandboxes[0]["metadata"]["name"]
        assert url.port in [port["port"] for port in sandboxes[0]["spec"]["ports"]]
    else:
        assert config.reward.sandbox_url is None


@pytest.mark.asyncio
@pytest.mark.parametrize("scenario_name", ["default", "multinode-128k"])
async def test_the_role_allows_exactly_what_pause_and_resume_use(kmock, scenario_name):
    manifests = render(values_of(scenario_name))
    used = await k8s.job_control_uses(kmock, manifests)
    assert used == k8s.granted(manifests) == {("batch", "jobs", manifests.job["metadata"]["name"], "get"),
                                              ("batch", "jobs", manifests.job["metadata"]["name"], "patch")}


def test_notes_give_status_pause_and_resume_commands_for_this_run(scenario, tmp_path):
    name, manifests = scenario
    config = k8s.run_config(manifests, k8s.PodView(manifests, 0), tmp_path)
    commands = {args.action: args for args in k8s.notes_commands(manifests.notes)}
    assert set(commands) == {"status", "pause", "resume"}
    for args in commands.values():
        assert args.run == config.control.run_name
    assert commands["status"].etcd == commands["pause"].etcd == config.control.etcd_endpoints[0]
    for action in ("pause", "resume"):
        assert commands[action].kubernetes and commands[action].namespace == NAMESPACE
        assert (commands[action].job or config.control.run_name) == manifests.job["metadata"]["name"]


def test_the_schema_lists_every_config_section_the_chart_does_not_own():
    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = set(schema["properties"]["config"]["properties"])
    assert sections | {"model", "parallel"} == set(Config.model_fields)


@pytest.mark.parametrize("values_text, message", [
    ("nodes: two\n", "at '/nodes': got string, want integer"),
    ("images:\n  trainer:\n    tag: 1.2\n", "at '/images/trainer/tag': got number, want string"),
    ("model:\n  hfPath: null\n", "at '/model': missing property 'hfPath'"),
    ("etcd:\n  enabled: false\n", "at '/etcd/externalEndpoints': minItems: got 0, want 1"),
    ("config:\n  model:\n    dtype: float32\n", "at '/config': additional properties 'model' not allowed"),
    ("config:\n  control:\n    run_name: other\n", "config.control.run_name is set by the chart"),
    ("config:\n  rollout:\n    sglang_args: [--tp-size, '2']\n", "config.rollout.sglang_args: --tp-size is set by the chart"),
    ("parallel:\n  cp: 2\n", "parallel.cp: context parallelism is not wired into megatron-rl's trainer yet"),
    ("parallel:\n  tp: 3\n", "parallel.tp × pp × cp = 3 does not divide the trainer's world size nodes × gpusPerPod = 8"),
    ("nodes: 2\ncheckpoints:\n  accessModes: [ReadWriteOnce]\nconfig:\n  hybrid:\n    weight_sync: nccl\n",
     "checkpoints.accessModes: with nodes > 1"),
    ("nodes: 2\ncheckpoints:\n  accessModes: [ReadWriteMany]\nconfig:\n  hybrid:\n    weight_sync: cuda_ipc\n",
     "config.hybrid.weight_sync: with nodes > 1 every pod's engine rolls out, and cuda_ipc hands weights over "
     "within one node only"),
    ("config:\n  hybrid:\n    peer_sidecar_urls: [http://x:1]\n", "config.hybrid.peer_sidecar_urls is set by the chart"),
])
def test_a_bad_values_file_fails_with_a_message_naming_the_field(tmp_path, capsys, values_text, message):
    values_file = tmp_path / "values.yaml"
    values_file.write_text(values_text)
    assert render_chart.main(["--values", str(values_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_render_chart_prints_the_manifests_of_a_values_file():
    result = subprocess.run([sys.executable, str(RENDER_TOOL), "--values", str(EXAMPLE)], capture_output=True,
                            text=True, timeout=120, check=True)
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    job = next(o for o in objects if o["kind"] == "Job")
    assert job["metadata"]["name"] == "long-cot-128k" and job["spec"]["completions"] == 4
    assert len(objects) == len(render(values_of("multinode-128k")).objects)


def trainer_entry_script(tmp_path: Path) -> Path:
    manifests = render({})
    script = tmp_path / "train.sh"
    script.write_text(k8s.mounted_file(manifests, manifests.trainer, manifests.trainer["command"][1]))
    return script


def run_dir_in_state(tmp_path: Path, state: str) -> Path:
    """A run directory whose run reports `state`, as its driver records it (here in the directory itself)."""
    run_dir = tmp_path / f"run-{state}"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(load_config().model_dump()))
    RunControl(run_dir, "megatron-rl").publish(RunStatus(run_name="megatron-rl", run_dir=str(run_dir), state=state,
                                                         driver="elsewhere:1", iteration=3))
    return run_dir


def start_entry_script(script: Path, run_dir: Path, *command: str) -> subprocess.Popen:
    env = dict(os.environ, RUN_DIR=str(run_dir), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.Popen(["/bin/sh", str(script), *command], env=env, stdout=subprocess.PIPE, text=True)


def test_the_trainer_entry_script_passes_torchruns_exit_status_on(tmp_path):
    script = trainer_entry_script(tmp_path)
    failed = start_entry_script(script, run_dir_in_state(tmp_path, "running"), "sh", "-c", "exit 3")
    assert failed.wait(timeout=60) == 3
    done = start_entry_script(script, run_dir_in_state(tmp_path, "done"), "true")
    assert done.wait(timeout=60) == 0


def test_after_a_pause_the_trainers_pod_waits_to_be_suspended_instead_of_completing(tmp_path):
    paused = start_entry_script(trainer_entry_script(tmp_path), run_dir_in_state(tmp_path, "paused"), "true")
    try:
        assert "run paused" in paused.stdout.readline()
        with pytest.raises(subprocess.TimeoutExpired):
            paused.wait(timeout=1)  # an exit would complete the Job's index, and a complete Job cannot resume
    finally:
        paused.kill()
        paused.wait()
