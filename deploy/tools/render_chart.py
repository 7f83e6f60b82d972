"""Print the Helm chart's manifests, rendered offline, to stdout (`make render-chart`).

    python deploy/tools/render_chart.py [--values FILE ...] [--name RELEASE] [--namespace NS]

Rendering is Helm's own (the Helm v4 Go SDK in-process, PyPI `helm-python-sdk`), so the output is what
`helm template` gives: values files are merged the way `helm -f` merges them (null deletes a default),
checked against values.schema.json, and the templates' own checks run. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parents[1] / "helm" / "megatron-rl"


def merged_values(files: list[str]) -> dict:
    """The user values of `files`, later files winning key by key (as `helm -f a -f b`)."""
    import helm_python as helm

    values: dict = {}
    for file in files:
        try:
            text = Path(file).read_text()
        except OSError as error:
            raise ValueError(f"--values {file}: cannot read it ({error.strerror})") from None
        values = _merge(values, helm.values_from_yaml(text) or {})
    return values


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def render(values: dict | None = None, *, name: str = "megatron-rl", namespace: str = "default",
           chart: Path = CHART) -> dict[str, str]:
    """Template path → rendered text (NOTES.txt included), as Helm renders an install."""
    import helm_python as helm

    return helm.Chart.load(str(chart)).render(values or {}, name=name, namespace=namespace, is_install=True)


# What others refer to comes first, as Helm installs it (a Job's pods need their account, config and claims).
KIND_ORDER = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim", "ResourceClaimTemplate",
              "Service", "NetworkPolicy", "StatefulSet", "Deployment", "Job")


def documents(rendered: dict[str, str]) -> list[tuple[str, str]]:
    """(source template, YAML document with its comments) of every object, in install order (NOTES.txt left out)."""
    found = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
            kind = re.search(r"^kind:[ \t]*(\S+)", document, flags=re.MULTILINE)
            if kind:
                order = KIND_ORDER.index(kind[1]) if kind[1] in KIND_ORDER else len(KIND_ORDER)
                found.append((order, path, document.strip()))
    return [(path, document) for _, path, document in sorted(found, key=lambda item: item[:2])]


def manifests_text(rendered: dict[str, str]) -> str:
    """The manifests as one YAML stream, each document headed by its source template (as `helm template`)."""
    return "".join(f"---\n# Source: {path}\n{document}\n" for path, document in documents(rendered))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", "-f", action="append", default=[], metavar="FILE", help="a values file (repeatable)")
    parser.add_argument("--name", default="megatron-rl", help="release name (default: megatron-rl)")
    parser.add_argument("--namespace", "-n", default="default", help="namespace (default: default)")
    args = parser.parse_args(argv)
    try:
        import helm_python as helm
    except ImportError:
        print("render-chart: error: needs helm-python-sdk: pip install 'helm-python-sdk==0.2.2' (in the dev extra)",
              file=sys.stderr)
        return 2
    try:
        rendered = render(merged_values(args.values), name=args.name, namespace=args.namespace)
    except (ValueError, helm.HelmError) as error:
        print(f"render-chart: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(manifests_text(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
