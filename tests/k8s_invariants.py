"""What a set of megatron-rl Kubernetes manifests must satisfy, whether the Helm chart rendered them or they
are the plain ones in k8s/: they validate against the Kubernetes schemas, and the run's pods are wired the
way megatron-rl's own parsers (its CLI, its config loader, torchrun's) read them.

Each check takes a `Manifests` and raises AssertionError naming what disagrees.
"""
from __future__ import annotations

import asyncio
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import kubernetes
import kubernetes_validate
from torch.distributed.run import get_args_parser as torchrun_parser

from megatron_rl.cli import build_parser
from megatron_rl.config import Config, load_config
from megatron_rl.control.etcd_store import parse_endpoints
from megatron_rl.control.kubernetes import JobControl
from megatron_rl.hybrid.commands import run_sidecar
from megatron_rl.hybrid.sidecar_protocol import SIDECAR_TOKEN_ENV
from megatron_rl.net import is_loopback
from megatron_rl.rollout.engine_process import engine_url

# resource.k8s.io/v1 (DRA, the chart's default GPU mode) is served from 1.34 on; 1.37 is the newest schema set.
KUBE_VERSIONS = ("1.34.0", "1.37.0")
JOB_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass
class Manifests:
    objects: list[dict]
    namespace: str
    notes: str = ""

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}"
        return found[0]

    @property
    def job(self) -> dict:
        return self.one("Job")

    @property
    def pod(self) -> dict:
        return self.job["spec"]["template"]["spec"]

    def container(self, name: str) -> dict:
        every = self.pod["containers"] + self.pod.get("initContainers", [])
        found = [c for c in every if c["name"] == name]
        assert len(found) == 1, f"expected one container {name} in the Job's pods, found {len(found)}"
        return found[0]

    @property
    def trainer(self) -> dict:
        return self.container("trainer")

    @property
    def rollout(self) -> dict:
        return self.container("rollout")


@dataclass
class PodView:
    """One pod of the Job as Kubernetes would start it: the downward API's values and `$(VAR)` expanded."""
    manifests: Manifests
    index: int
    name: str = field(init=False)

    def __post_init__(self):
        self.name = f"{self.manifests.job['metadata']['name']}-{self.index}-x7k2q"

    def env(self, container: dict) -> dict[str, str]:
        values: dict[str, str] = {}
        for variable in container.get("env", []):
            if "value" in variable:
                values[variable["name"]] = _expand(variable["value"], values)
                continue
            source = variable["valueFrom"]
            if "secretKeyRef" in source:  # stands for the Secret's value, which only the cluster has
                values[variable["name"]] = f"<secret {source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
                continue
            path = source["fieldRef"]["fieldPath"]
            values[variable["name"]] = {"metadata.name": self.name, JOB_COMPLETION_INDEX: str(self.index)}[path]
        return values

    def args(self, container: dict) -> list[str]:
        env = self.env(container)
        return [_expand(argument, env) for argument in container.get("args", [])]


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


# ------------------------------------------------------------------------------------------- schemas

def check_schemas(manifests: Manifests) -> None:
    for obj in manifests.objects:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}: "
                                     f"{error.message} at {list(error.path)}") from None


# ------------------------------------------------------------------------------------------- the run config

def mounted_file(manifests: Manifests, container: dict, path: str) -> str:
    """The text of `path` as `container` sees it, from the ConfigMap volume mounted over it."""
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in manifests.pod["volumes"] if v["name"] == mount["name"])
            config_map = manifests.one("ConfigMap", volume["configMap"]["name"])
            return config_map["data"][path[len(prefix):]]
    raise AssertionError(f"{path} is not on a volume of container {container['name']}")


def trainer_command(manifests: Manifests, pod: PodView):
    """(torchrun's parsed arguments, megatron-rl's parsed `train` arguments) of the trainer container."""
    trainer = manifests.trainer
    assert trainer["command"][0] == "/bin/sh", "the trainer runs its entry script with sh"
    script = mounted_file(manifests, trainer, trainer["command"][1])
    assert '"$@"' in script, "the entry script must run the torchrun command it is given"
    args = pod.args(trainer)
    assert args[0] == "torchrun"
    torchrun = torchrun_parser().parse_args(args[1:])
    assert torchrun.module and torchrun.training_script == "megatron_rl.cli"
    train = build_parser().parse_args(torchrun.training_script_args)
    assert train.command == "train"
    return torchrun, train


def sidecar_command(manifests: Manifests, pod: PodView):
    rollout = manifests.rollout
    assert rollout["command"] == ["megatron-rl"]
    sidecar = build_parser().parse_args(pod.args(rollout))
    assert sidecar.handler is run_sidecar
    return sidecar


def run_config(manifests: Manifests, pod: PodView, tmp_path: Path) -> Config:
    """The config the trainer of `pod` runs with, loaded by megatron-rl's own loader; the sidecar's must
    be the same."""
    _, train = trainer_command(manifests, pod)
    sidecar = sidecar_command(manifests, pod)
    configs = []
    for who, container, args in (("trainer", manifests.trainer, train), ("rollout", manifests.rollout, sidecar)):
        path = tmp_path / f"{who}-{pod.index}.yaml"
        path.write_text(mounted_file(manifests, container, args.config))
        configs.append(load_config(path, args.overrides))
    assert configs[0] == configs[1], "the trainer and the sidecar must load the same run config"
    return configs[0]


def check_run_config(manifests: Manifests, tmp_path: Path) -> Config:
    pods = [PodView(manifests, index) for index in range(manifests.job["spec"]["completions"])]
    config = run_config(manifests, pods[-1], tmp_path)
    job_name = manifests.job["metadata"]["name"]
    assert config.hybrid.pod_name == pods[-1].name, "hybrid.pod_name must be the pod's own name"
    assert config.control.store == "etcd"
    assert config.control.run_name == job_name, "`runs pause RUN --kubernetes` finds the Job by the run's name"
    _, train = trainer_command(manifests, pods[-1])
    assert train.auto_resume, "a restarted or resumed pod must continue from the run's checkpoint"
    runs_mount = next(m for m in manifests.trainer["volumeMounts"] if train.run_dir.startswith(m["mountPath"] + "/"))
    volume = next(v for v in manifests.pod["volumes"] if v["name"] == runs_mount["name"])
    assert "persistentVolumeClaim" in volume, "the run directory (checkpoints) must be on a PVC"
    assert config.rollout.engine == "sglang" and config.rollout.engine_url is None
    model_mounts = [m for m in manifests.trainer["volumeMounts"] if config.model.hf_path.startswith(m["mountPath"] + "/")]
    for mount in model_mounts:
        assert mount in manifests.rollout["volumeMounts"], "the engine loads the model from the same path"
    return config


# ------------------------------------------------------------------------------------------- GPUs and /dev/shm

def gpus_seen(manifests: Manifests) -> dict[str, int]:
    """Container name → GPUs it sees: through the pod's DRA claim, a device-plugin request, or (the
    fallback) NVIDIA_VISIBLE_DEVICES=all beside a container that requested the whole pod's GPUs."""
    claims = {c["name"]: c for c in manifests.pod.get("resourceClaims", [])}
    seen: dict[str, int] = {}
    for name in ("trainer", "rollout"):
        container = manifests.container(name)
        resources = container.get("resources", {})
        counts = []
        for claim in resources.get("claims", []):
            template = manifests.one("ResourceClaimTemplate", claims[claim["name"]]["resourceClaimTemplateName"])
            counts += [r["exactly"]["count"] for r in template["spec"]["spec"]["devices"]["requests"]
                       if r["exactly"]["allocationMode"] == "ExactCount"]
        counts += [int(v) for k, v in resources.get("limits", {}).items() if k.endswith("/gpu")]
        seen[name] = sum(counts)
    for name, count in seen.items():
        env = {e["name"]: e.get("value") for e in manifests.container(name).get("env", [])}
        if count == 0 and env.get("NVIDIA_VISIBLE_DEVICES") == "all":
            seen[name] = max(seen.values())
    return seen


def check_gpus_shared(manifests: Manifests, tmp_path: Path) -> int:
    seen = gpus_seen(manifests)
    assert seen["trainer"] > 0 and seen["trainer"] == seen["rollout"], f"both containers must see the pod's GPUs: {seen}"
    dra_claims = [{c["name"] for c in manifests.container(n).get("resources", {}).get("claims", [])}
                  for n in ("trainer", "rollout")]
    if any(dra_claims):
        assert dra_claims[0] == dra_claims[1], "with DRA both containers must name the same claim"
        for name in ("trainer", "rollout"):  # a device-plugin GPU on top would be a second, different device
            limits = manifests.container(name).get("resources", {}).get("limits", {})
            assert not [k for k in limits if k.endswith("/gpu")], f"{name} requests device-plugin GPUs beside its claim"
    pod = PodView(manifests, 0)
    torchrun, _ = trainer_command(manifests, pod)
    assert int(torchrun.nproc_per_node) == seen["trainer"], "one trainer rank per GPU"
    config = run_config(manifests, pod, tmp_path)
    engine_layout = dict(zip(config.rollout.sglang_args[::2], config.rollout.sglang_args[1::2]))
    assert int(engine_layout["--tp-size"]) * int(engine_layout["--dp-size"]) == seen["rollout"], \
        "the SGLang engines must span the pod's GPUs"
    return seen["trainer"]


def check_shared_memory(manifests: Manifests, tmp_path: Path) -> None:
    config = run_config(manifests, PodView(manifests, 0), tmp_path)
    shm_volumes = []
    for name in ("trainer", "rollout"):
        mounts = [m for m in manifests.container(name)["volumeMounts"] if m["mountPath"] == config.hybrid.shm_dir]
        assert len(mounts) == 1, f"{name} must mount hybrid.shm_dir ({config.hybrid.shm_dir})"
        shm_volumes.append(mounts[0]["name"])
    assert shm_volumes[0] == shm_volumes[1], "both containers must mount the same /dev/shm"
    volume = next(v for v in manifests.pod["volumes"] if v["name"] == shm_volumes[0])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert manifests.pod["shareProcessNamespace"] is True, "CUDA IPC needs the containers to see each other's processes"


# ------------------------------------------------------------------------------------------- rendezvous and ports

def service_ports_resolve(manifests: Manifests, service: dict) -> dict[str, int]:
    """Service port name → the container port it reaches, checking its selector picks a workload."""
    selector = service["spec"]["selector"]
    workloads = [o for o in manifests.objects if o["kind"] in ("Job", "StatefulSet", "Deployment")
                 and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
    assert len(workloads) == 1, f"Service {service['metadata']['name']} selects {len(workloads)} workloads"
    spec = workloads[0]["spec"]["template"]["spec"]
    container_ports = {p.get("name"): p["containerPort"]
                       for c in spec["containers"] for p in c.get("ports", [])}
    resolved = {}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        number = container_ports.get(target) if isinstance(target, str) else target
        assert number in container_ports.values(), \
            f"Service {service['metadata']['name']} port {port['name']} targets {target}, which no container exposes"
        resolved[port["name"]] = number
        assert number == port["port"], f"Service {service['metadata']['name']}: port {port['port']} ≠ container port {number}"
    return resolved


def check_rendezvous(manifests: Manifests, tmp_path: Path) -> None:
    job = manifests.job
    nodes = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == nodes
    job_name = job["metadata"]["name"]
    assert len(f"{job_name}-{nodes - 1}") <= 63, "pod host names <job>-<index> must be DNS labels"
    service = manifests.one("Service", manifests.pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    ports = service_ports_resolve(manifests, service)
    config = run_config(manifests, PodView(manifests, 0), tmp_path)
    for index in range(nodes):
        pod = PodView(manifests, index)
        torchrun, _ = trainer_command(manifests, pod)
        assert torchrun.nnodes == str(nodes), "torchrun --nnodes must be the Job's pod count"
        assert torchrun.node_rank == index, "node rank from the pod's completion index"
        # Indexed Job pods are named <job>-<index> in the Job's subdomain: pod 0 hosts the rendezvous.
        assert torchrun.master_addr == f"{job_name}-0.{service['metadata']['name']}"
        assert torchrun.master_port in ports.values(), "torchrun's master port must be the headless Service's"
        world_size = nodes * int(torchrun.nproc_per_node)
        model_parallel = config.parallel.tp * config.parallel.pp * config.parallel.cp
        assert world_size % model_parallel == 0, f"TP×PP×CP={model_parallel} must divide the world size {world_size}"


def check_reach(manifests: Manifests, tmp_path: Path) -> None:
    """One pod: its sidecar and engine listen on the pod's loopback, with no token. More: every pod's listen
    on the pod network with the run's token, pod 0's driver reaches the others at their DNS names in the
    rendezvous Service, and their engines get the weights by broadcast, or by their sidecars fetching files
    from each other at the URLs they advertise."""
    nodes = manifests.job["spec"]["completions"]
    config = run_config(manifests, PodView(manifests, 0), tmp_path)
    tokens = [PodView(manifests, 0).env(container).get(SIDECAR_TOKEN_ENV)
              for container in (manifests.trainer, manifests.rollout)]
    if nodes == 1:
        assert is_loopback(config.hybrid.sidecar_host) and is_loopback(config.rollout.engine_host)
        assert config.hybrid.peer_sidecar_urls == [] and tokens == [None, None]
        return
    job_name, service = manifests.job["metadata"]["name"], manifests.pod["subdomain"]
    assert (config.hybrid.sidecar_host, config.rollout.engine_host) == ("0.0.0.0", "0.0.0.0")
    assert config.hybrid.peer_sidecar_urls == [f"http://{job_name}-{index}.{service}:{config.hybrid.sidecar_port}"
                                               for index in range(1, nodes)]
    assert config.hybrid.weight_sync in ("disk", "nccl"), "cuda_ipc does not reach the other pods' engines"
    secret = manifests.one("Secret", tokens[0].removeprefix("<secret ").split("/")[0])
    assert tokens[0] == tokens[1] == f"<secret {secret['metadata']['name']}/token>" and secret["data"]["token"]
    for index in range(nodes):
        pod = PodView(manifests, index)
        pod_config = run_config(manifests, pod, tmp_path)
        assert pod_config.hybrid.advertise_host == f"{job_name}-{index}.{service}", \
            "each pod's engine is advertised at its own DNS name"
        # What a sidecar tells other pods to fetch weight files from (sidecar_server.serve) is where pod 0 reaches it.
        advertised = engine_url(pod_config.hybrid.sidecar_host, pod_config.hybrid.sidecar_port,
                                pod_config.hybrid.advertise_host)
        assert index == 0 or advertised == config.hybrid.peer_sidecar_urls[index - 1]


def check_ports(manifests: Manifests, tmp_path: Path) -> None:
    config = run_config(manifests, PodView(manifests, 0), tmp_path)
    # Trainer and probes reach the pod's own sidecar on its loopback (check_reach: who else may).
    sidecar_url = urlparse(config.hybrid.sidecar_url)
    assert is_loopback(sidecar_url.hostname) and sidecar_url.port == config.hybrid.sidecar_port
    for probe in ("startupProbe", "livenessProbe"):
        urls = re.findall(r"https?://[^'\" ]+", " ".join(manifests.rollout[probe]["exec"]["command"]))
        assert urls == [f"{config.hybrid.sidecar_url}/v1/health"], f"the rollout {probe} must ask the sidecar's health"
    sidecar = sidecar_command(manifests, PodView(manifests, 0))
    torchrun, _ = trainer_command(manifests, PodView(manifests, 0))
    pod_ports = [config.hybrid.sidecar_port, sidecar.engine_port, torchrun.master_port]
    assert len(set(pod_ports)) == 3, f"sidecar, engine and rendezvous ports share the pod's network: {pod_ports}"
    for service in manifests.all("Service"):
        service_ports_resolve(manifests, service)
    etcd_sets = [s for s in manifests.all("StatefulSet") if s["spec"]["template"]["spec"]["containers"][0]["name"] == "etcd"]
    for host, port in parse_endpoints(config.control.etcd_endpoints):
        if etcd_sets:  # the run's own etcd: the endpoint is its client Service
            name, namespace, suffix = host.split(".")
            assert (namespace, suffix) == (manifests.namespace, "svc")
            assert port in service_ports_resolve(manifests, manifests.one("Service", name)).values()
    for etcd in etcd_sets:
        container = etcd["spec"]["template"]["spec"]["containers"][0]
        by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
        flags = dict(a[2:].split("=", 1) for a in container["args"])
        assert urlparse(flags["listen-client-urls"]).port == by_name["client"]
        assert urlparse(flags["listen-peer-urls"]).port == by_name["peer"]
        assert urlparse(flags["listen-metrics-urls"]).port == by_name["metrics"]
        annotations = etcd["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == by_name["metrics"]
            assert annotations["prometheus.io/path"] == "/metrics"
    for sandbox in [d for d in manifests.all("Deployment") if d["spec"]["template"]["spec"]["containers"][0]["name"] == "sandbox"]:
        container = sandbox["spec"]["template"]["spec"]["containers"][0]
        serve = build_parser().parse_args(container["args"])
        assert (serve.command, serve.action, serve.host) == ("sandbox", "serve", "0.0.0.0")
        assert serve.port == container["ports"][0]["containerPort"]
        policy = manifests.one("NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= sandbox["spec"]["template"]["metadata"]["labels"].items()
        admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        assert admitted.items() <= manifests.job["spec"]["template"]["metadata"]["labels"].items(), \
            "the sandbox (no authentication) admits the run's pods"


# ------------------------------------------------------------------------------------------- RBAC

def granted(manifests: Manifests) -> set[tuple[str, str, str, str]]:
    """(API group, resource, name, verb) the Job's pods may use, through RoleBindings of their account."""
    account = manifests.pod["serviceAccountName"]
    assert not manifests.all("ClusterRole") and not manifests.all("ClusterRoleBinding")
    grants = set()
    for binding in manifests.all("RoleBinding"):
        if {"kind": "ServiceAccount", "name": account, "namespace": manifests.namespace} not in binding["subjects"]:
            continue
        assert binding["roleRef"]["kind"] == "Role"
        role = manifests.one("Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            assert rule.get("resourceNames"), "a rule without resourceNames would cover every object"
            grants |= {(g, r, n, v) for g in rule["apiGroups"] for r in rule["resources"]
                       for n in rule["resourceNames"] for v in rule["verbs"]}
    return grants


_VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}


async def job_control_uses(kmock, manifests: Manifests) -> set[tuple[str, str, str, str]]:
    """(API group, resource, name, verb) that megatron-rl's JobControl uses to pause and resume this run's
    Job, seen by kmock's API-server emulator: the rendered Job is created there, then suspended and resumed."""
    api_client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=str(kmock.url)))
    job = manifests.job
    await asyncio.to_thread(kubernetes.client.BatchV1Api(api_client).create_namespaced_job, manifests.namespace, job)
    before = len(list(kmock))
    control = JobControl(manifests.namespace, api_client)
    name = job["metadata"]["name"]
    assert await asyncio.to_thread(control.suspended, name) is False
    await asyncio.to_thread(control.set_suspended, name, True)
    assert kmock.objects["batch/v1/jobs", manifests.namespace, name]["spec"]["suspend"] is True
    await asyncio.to_thread(control.set_suspended, name, False)
    used = set()
    for request in list(kmock)[before:]:
        assert request.namespace == manifests.namespace
        method = request.method.value.upper()
        verb = {"PATCH": "patch", "PUT": "update"}.get(method) or _VERBS[request.action.name]
        used.add((request.resource.group, request.resource.plural, request.name, verb))
    return used


# ------------------------------------------------------------------------------------------- NOTES

def notes_commands(notes: str) -> list:
    """The `megatron-rl ...` commands of NOTES.txt, parsed by megatron-rl's CLI."""
    parsed = []
    for line in notes.splitlines():
        if "megatron-rl runs" not in line:
            continue
        words = shlex.split(line[line.index("megatron-rl runs"):])
        parsed.append(build_parser().parse_args(words[1:]))
    return parsed
