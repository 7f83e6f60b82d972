# The code-sandbox image (`megatron-rl sandbox serve`): Python, bubblewrap, libseccomp and g++ + megatron-rl.
# It runs no model, so it has no torch. Build from the repository root:
#   docker build -f deploy/docker/sandbox.Dockerfile -t REGISTRY/megatron-rl/sandbox:TAG .
# Build args:
#   BASE_IMAGE  a Debian-based Python >= 3.11 image (bubblewrap >= 0.8: Debian 12 or later)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap libseccomp2 g++ \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1
COPY deploy/docker/install_package.py /tmp/install_package.py
COPY setup.py /opt/megatron-rl/setup.py
COPY megatron_rl /opt/megatron-rl/megatron_rl
RUN python /tmp/install_package.py /opt/megatron-rl --without torch \
 && megatron-rl sandbox --help >/dev/null

# Root: bwrap-privileged mode switches each sandbox to its own uid (see the chart's README).
WORKDIR /tmp
