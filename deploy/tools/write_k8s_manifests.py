"""Write k8s/ (plain manifests for users without Helm) from the Helm chart, so the two never differ.

    python deploy/tools/write_k8s_manifests.py [--check]

Renders deploy/helm/megatron-rl with k8s/values.yaml (release megatron-rl, namespace megatron-rl), drops
what only Helm uses (its chart and managed-by labels, its resource policy), sets every object's namespace,
and writes one file per part: etcd.yaml, rbac.yaml, sandbox.yaml, example-job.yaml. `--check` writes
nothing and exits 1 if the files are not what it would write.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
RELEASE = "megatron-rl"
NAMESPACE = "megatron-rl"
HELM_ONLY = {"labels": ("helm.sh/chart", "app.kubernetes.io/managed-by"), "annotations": ("helm.sh/resource-policy",)}
PARTS = {  # file → what goes in it; the Job and what only it uses go to example-job.yaml
    "rbac.yaml": lambda o: o["kind"] in ("ServiceAccount", "Role", "RoleBinding"),
    "etcd.yaml": lambda o: _component(o) == "etcd",
    "sandbox.yaml": lambda o: _component(o) == "sandbox",
}
HEADER = """# {part}: generated from deploy/helm/megatron-rl with k8s/values.yaml by
#   python deploy/tools/write_k8s_manifests.py
# Edit the chart or k8s/values.yaml, not this file. Apply with: kubectl apply -f k8s/{part}
# (namespace {namespace}: kubectl create namespace {namespace}). See k8s/README.md.
"""


def _component(obj: dict) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def _render_chart_module():
    spec = importlib.util.spec_from_file_location("render_chart", Path(__file__).with_name("render_chart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain(obj: dict) -> dict:
    metadata = obj["metadata"]
    for field, keys in HELM_ONLY.items():
        for key in keys:
            metadata.get(field, {}).pop(key, None)
        if field in metadata and not metadata[field]:
            del metadata[field]
    metadata["namespace"] = NAMESPACE
    return obj


def files() -> dict[str, str]:
    """File name under k8s/ → its text."""
    render_chart = _render_chart_module()
    values = render_chart.merged_values([str(K8S_DIR / "values.yaml")])
    rendered = render_chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = [plain(yaml.safe_load(document)) for _, document in render_chart.documents(rendered)]
    grouped: dict[str, list[dict]] = {part: [] for part in (*PARTS, "example-job.yaml")}
    for obj in objects:
        part = next((name for name, belongs in PARTS.items() if belongs(obj)), "example-job.yaml")
        grouped[part].append(obj)
    return {part: HEADER.format(part=part, namespace=NAMESPACE)
            + yaml.safe_dump_all(objs, sort_keys=False, explicit_start=True, width=120)
            for part, objs in grouped.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if k8s/ differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for part, text in files().items():
        path = K8S_DIR / part
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(part)
        else:
            path.write_text(text)
    if stale:
        print(f"k8s/ is out of date with the chart ({', '.join(stale)}); run: python deploy/tools/write_k8s_manifests.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
