"""k8s/: the plain manifests for users without Helm. They are the chart rendered with k8s/values.yaml
(deploy/tools/write_k8s_manifests.py), so they must be up to date with it, carry nothing Helm-only, and
satisfy everything the chart's manifests do (k8s_invariants.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k8s_invariants as k8s

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
NAMESPACE = "megatron-rl"
PARTS = ("etcd.yaml", "rbac.yaml", "sandbox.yaml", "example-job.yaml")


@pytest.fixture(scope="module")
def manifests() -> k8s.Manifests:
    objects = [doc for part in PARTS for doc in yaml.safe_load_all((K8S_DIR / part).read_text()) if doc]
    return k8s.Manifests(objects, NAMESPACE)


def test_the_plain_manifests_are_what_the_chart_renders():
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "tools" / "write_k8s_manifests.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_each_part_holds_what_its_name_says(manifests):
    kinds = {part: sorted(doc["kind"] for doc in yaml.safe_load_all((K8S_DIR / part).read_text()) if doc)
             for part in PARTS}
    assert kinds["rbac.yaml"] == ["Role", "RoleBinding", "ServiceAccount"]
    assert kinds["etcd.yaml"] == ["Service", "Service", "StatefulSet"]
    assert kinds["sandbox.yaml"] == ["Deployment", "NetworkPolicy", "Service"]
    assert kinds["example-job.yaml"] == ["ConfigMap", "Job", "PersistentVolumeClaim", "ResourceClaimTemplate", "Service"]


def test_every_object_is_namespaced_valid_and_free_of_helm_labels(manifests):
    k8s.check_schemas(manifests)
    for obj in manifests.objects:
        metadata = obj["metadata"]
        assert metadata["namespace"] == NAMESPACE
        assert not {"helm.sh/chart", "app.kubernetes.io/managed-by"} & set(metadata.get("labels", {}))
        assert "helm.sh/resource-policy" not in metadata.get("annotations", {})


def test_the_example_job_is_wired_like_the_charts(manifests, tmp_path):
    config = k8s.check_run_config(manifests, tmp_path)
    assert config.control.run_name == "example-run"
    assert k8s.check_gpus_shared(manifests, tmp_path) == 8
    k8s.check_shared_memory(manifests, tmp_path)
    k8s.check_rendezvous(manifests, tmp_path)
    k8s.check_ports(manifests, tmp_path)
    k8s.check_reach(manifests, tmp_path)


@pytest.mark.asyncio
async def test_the_role_allows_exactly_what_pause_and_resume_use(kmock, manifests):
    assert await k8s.job_control_uses(kmock, manifests) == k8s.granted(manifests)
