# The rollout image: SGLang + megatron-rl[rollout], for the pod's rollout container (`megatron-rl sidecar`,
# which starts and owns the SGLang engine). Build from the repository root:
#   docker build -f deploy/docker/rollout.Dockerfile -t REGISTRY/megatron-rl/rollout:TAG .
# Build args:
#   BASE_IMAGE  an SGLang image of the version setup.py's rollout extra pins (sglang==0.5.23); its torch is
#               kept, and pip fails rather than replace it if the two disagree
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1
COPY deploy/docker/install_package.py /tmp/install_package.py
COPY setup.py /opt/megatron-rl/setup.py
COPY megatron_rl /opt/megatron-rl/megatron_rl
RUN python3 /tmp/install_package.py /opt/megatron-rl --extras rollout --without torch \
 && megatron-rl sidecar --help >/dev/null && python3 -c "import sglang"

WORKDIR /workspace
