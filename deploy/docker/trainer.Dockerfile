# The trainer image: NGC PyTorch (CUDA, NCCL, PyTorch, Transformer Engine, apex) + megatron-core + megatron-rl.
# Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t REGISTRY/megatron-rl/trainer:TAG .
# Build args:
#   BASE_IMAGE          the NGC PyTorch image (its torch is kept; megatron-rl's CPU torch pin is not applied)
#   TRANSFORMER_ENGINE  empty: the base image's Transformer Engine; else a pip requirement to build instead,
#                       e.g. "transformer_engine[pytorch]==2.8.0" (needs the base's CUDA toolkit)
#   APEX_REF            empty: the base image's apex; else a git ref of github.com/NVIDIA/apex to build
#   MAX_JOBS            parallel compile jobs for those builds
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG TRANSFORMER_ENGINE=""
ARG APEX_REF=""
ARG MAX_JOBS=8
ENV PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS}

RUN if [ -n "$TRANSFORMER_ENGINE" ]; then pip install --no-cache-dir --no-build-isolation "$TRANSFORMER_ENGINE"; fi \
 && python -c "import transformer_engine.pytorch" \
 || { echo "no usable Transformer Engine: set --build-arg TRANSFORMER_ENGINE=..." >&2; exit 1; }
RUN if [ -n "$APEX_REF" ]; then \
      APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install --no-cache-dir --no-build-isolation \
        "git+https://github.com/NVIDIA/apex.git@${APEX_REF}"; \
    fi \
 && python -c "import apex" \
 || { echo "no apex: set --build-arg APEX_REF=..." >&2; exit 1; }

# megatron-rl with the train extra (megatron-core, pinned in setup.py) and deploy (the kubernetes client
# that `runs pause|resume --kubernetes` uses from inside the pod).
COPY deploy/docker/install_package.py /tmp/install_package.py
COPY setup.py /opt/megatron-rl/setup.py
COPY megatron_rl /opt/megatron-rl/megatron_rl
RUN python /tmp/install_package.py /opt/megatron-rl --extras train,deploy --without torch \
 && megatron-rl --help >/dev/null && python -c "import megatron.core, megatron_rl.train.model"

WORKDIR /workspace
