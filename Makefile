# Two-command quickstart:  `make demo` (set up + run the main job)  and  `make test`.
VENV       ?= .venv
PY         := $(VENV)/bin/python
# CPU machines take the local CPU wheel; on a GPU machine with its own torch: make TORCH_SPEC= ...
TORCH_SPEC ?= torch==2.13.0
SHARED     ?= ../shared
# Engines whose own code the tests run, from their PyPI wheels without their GPU stacks (--no-deps;
# the light packages their imports need are in the test extra). torchvision: see tests/engine_env.py.
ENGINES_SPEC ?= sglang==0.5.23 vllm==0.34.0 torchvision==0.28.0 compressed-tensors==0.18.0

.PHONY: setup demo test test-all k8s-apiserver proto

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e '.[test]'
	$(if $(ENGINES_SPEC),$(PY) -m pip install -q --no-deps $(ENGINES_SPEC))
	@echo "compiling the planner's numba kernels into their cache (once; 1-3 min on 2 CPUs)"
	$(VENV)/bin/expertplane warm
	touch $@

# Build (once, cached in ~/.cache/expertplane-k8s) the real kube-apiserver the operator tests use.
# The build is silent for minutes: say what it is and how far it got every 30 s.
K8S_CACHE  ?= $(or $(EXPERTPLANE_K8S_CACHE),$(HOME)/.cache/expertplane-k8s)
k8s-apiserver:
	@if [ ! -x $(SHARED)/k8s/test-apiserver ]; then \
		echo "no $(SHARED)/k8s/test-apiserver: Kubernetes tests will skip"; \
	elif [ -x $(K8S_CACHE)/bin/kube-apiserver ]; then :; \
	else \
		echo "building kube-apiserver for the Kubernetes tests (once, cached in $(K8S_CACHE)):"; \
		echo "  root + apt (Debian's kubernetes source, Go, etcd); 4-12 min on 2 CPUs; log $(K8S_CACHE)/build.log"; \
		start=$$(date +%s); $(SHARED)/k8s/test-apiserver build >/dev/null & pid=$$!; \
		while kill -0 $$pid 2>/dev/null; do \
			for i in $$(seq 30); do kill -0 $$pid 2>/dev/null && sleep 1; done; \
			kill -0 $$pid 2>/dev/null && echo "  still building: $$(( $$(date +%s) - start )) s," \
				"$$(cat $(K8S_CACHE)/build.log 2>/dev/null | wc -l) lines of build log"; \
		done; \
		wait $$pid && echo "  kube-apiserver built in $$(( $$(date +%s) - start )) s"; \
	fi

demo: setup
	$(VENV)/bin/expertplane demo

proto: setup
	$(PY) -m expertplane.proto.generate

test: setup k8s-apiserver
	$(PY) -m expertplane.proto.generate --check
	$(PY) -m pytest

# Slow and GPU tests too (opt-in).
test-all: setup k8s-apiserver
	$(PY) -m pytest -m ""
