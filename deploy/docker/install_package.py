"""Install megatron-rl (the repository at SRC) into an image, with its dependencies but not those in --without.

    python install_package.py SRC [--extras train,deploy] [--without torch]

Every image installs the same package this way. A requirement named in --without is not installed: the base
image's build is kept (NGC's and SGLang's torch are built for their CUDA, and the package pins the CPU
build's version) and pinned as a constraint, so nothing else can replace it; a package the image does not
have stays absent (the sandbox needs no torch). Fails if pip cannot satisfy the rest alongside.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # slim images: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the megatron-rl source directory (with setup.py)")
    parser.add_argument("--extras", default="", help="comma-separated extras of setup.py, e.g. train,deploy")
    parser.add_argument("--without", default="", help="comma-separated requirements not to install")
    args = parser.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    without = {canonicalize_name(n) for n in args.without.split(",") if n}

    pip("--no-deps", args.src)
    wanted, constraints = [], []
    for text in importlib.metadata.requires("megatron-rl") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in ["", *extras]):
            continue
        name = canonicalize_name(requirement.name)
        if name not in without:
            wanted.append(str(requirement).split(";")[0])
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            print(f"install_package: {requirement.name}: not installed and not needed in this image")
            continue
        print(f"install_package: {requirement.name}: keeping the base image's {version} (the package asks {requirement.specifier})")
        constraints.append(f"{requirement.name}=={version}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraint_file:
        constraint_file.write("\n".join(constraints) + "\n")
        constraint_file.flush()
        pip("--constraint", constraint_file.name, *wanted)
    subprocess.run([sys.executable, "-m", "pip", "check"], check=False)  # report conflicts the base brought along
    return 0


if __name__ == "__main__":
    sys.exit(main())
