"""megatron-rl: Kimi k1.5-style reinforcement learning of LLMs on megatron-core."""
from setuptools import find_packages, setup

# torch is pinned exactly: CPU machines carry a local 2.13.0 CPU build, and an unpinned torch
# would pull several GB of CUDA wheels.
TORCH = "torch==2.13.0"

setup(
    name="megatron-rl",
    version="0.1.0",
    description="Kubernetes-native large-scale RL for LLMs (k1.5-style) on megatron-core",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    package_data={"megatron_rl": ["examples/*.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        TORCH,
        "numpy",
        "pydantic>=2.6",
        "pyyaml>=6",
        "safetensors>=0.4",
        "transformers>=4.51,<6",
        "rich>=13",
        # Answer equivalence for math rewards (fractions, LaTeX, sets) without hand-written parsers.
        "math-verify==0.9.0",
        # The embedded engine server speaks SGLang's HTTP API (the client itself needs only stdlib).
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # Run-metadata store client (control/etcd_store.py): the maintained fork of etcd3 with the same
        # `import etcd3` API; its generated code needs protobuf >= 5.29 (checked: grpcio 1.85.1, protobuf 7.36.2).
        "python3-etcd3==0.13.0",
        "grpcio>=1.60",
        "protobuf>=5.29",
        # The code sandbox's syscall filter (a ctypes wrapper of Debian's libseccomp2).
        "pyseccomp==0.1.2",
    ],
    extras_require={
        # megatron-core 0.17+ needs Python 3.12; psutil is an undeclared need of its
        # dist_checkpointing (a save hangs without it). transformer-engine and apex are
        # GPU-image extras installed in deploy/docker, not here.
        "train": ["megatron-core==0.16.1", "psutil", "tensorboard"],
        # The real GGUF demo model is dequantized through transformers.
        "demo": ["gguf", "accelerate"],
        # SGLang is the production engine and runs on GPU only.
        "rollout": ["sglang==0.5.23"],
        # Job suspend/resume. (Not the old `etcd3` package: it installs the same module as python3-etcd3.)
        "deploy": ["kubernetes==37.0.2"],
        # kmock: an in-memory Kubernetes API emulator for the Job-control tests (with pytest-asyncio).
        "dev": ["pytest>=8", "pytest-timeout", "pytest-asyncio>=1.0", "kmock==0.8", "kubernetes==37.0.2",
                # the Helm chart's tests: Helm's own renderer in process, offline Kubernetes schemas
                "helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0"],
        # PNG plots of the benchmarks.
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["megatron-rl=megatron_rl.cli:main"]},
)
