# kubetrain: `make demo` and `make test` bootstrap .venv themselves (README.md).
# torch is pinned here only: PyPI's torch 2.13.0 wheel (with its CUDA libraries, several GB;
# it runs on the CPU too); pyproject keeps a wide range.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test lint e2e bench crds chart-test cluster cluster-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[operator,trainer,dev]"
	touch $@

venv: $(STAMP)

# The tiny three-stage pipeline: from_scratch -> sft -> dpo on the bundled data.
demo: $(STAMP)
	$(BIN)/kubetrain run examples/pipeline-tiny.yaml

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd and JobSet, built
# from Go modules (tests/cluster/*/go.mod) into .tools/k8s-<version>/, and the tests' S3
# server (versitygw) into .tools/versitygw-<version>/; Go's cache makes a rebuild take seconds.
cluster-tools: $(STAMP)
	$(BIN)/python scripts/build_cluster.py

# A real control plane and two process kubelets on this machine (Linux, root); Ctrl-C stops it.
cluster: cluster-tools
	$(BIN)/python tests/cluster/cluster.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Everything but the benchmarks: unit, trainer (real tiny training), operator, chart and
# the cluster tier on a real control plane. Plain `pytest` skips e2e for speed.
test: lint cluster-tools
	$(BIN)/pytest -m "not bench" --durations=40

# The cluster tier alone: the real control plane, the operator installed with helm.
e2e: cluster-tools
	$(BIN)/pytest -m e2e --durations=0

# Benchmarks, printed as tables: kubetrain sft, lora and dpo against TRL (tests/bench/test_bench_throughput.py), and
# the operator with 1000 TrainingRuns on the real control plane (test_bench_operator.py, root;
# KUBETRAIN_BENCH_RUNS=100 for a quicker pass; -k operator alone), and from_scratch over a corpus
# larger than the memory cgroup it runs in, RSS over time (test_bench_large_corpus.py, root).
bench: cluster-tools
	$(BIN)/pytest -m bench -s tests/bench

crds: $(STAMP)
	$(BIN)/kubetrain crds
	$(BIN)/python scripts/sync_chart.py

chart-test: $(STAMP)
	$(BIN)/python scripts/sync_chart.py --check
	$(BIN)/pytest tests/chart

clean:
	rm -rf $(VENV) .tools .cluster outputs .pytest_cache .ruff_cache
