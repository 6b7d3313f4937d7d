# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# NOTE: installed before the export extra so that pip keeps this CPU build instead of resolving a newer
# (multi-GB CUDA) torch. Override on a machine where another build is wanted.
TORCH_SPEC ?= torch==2.13.0
MODEL_REPO ?= models/all-MiniLM-L6-v2
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test bench bench-soak lint proto docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# One stamp for everything: the export toolchain is needed on first `make serve` to build the default model.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[cpu,export,dev,bench,ann]"
	touch $@

$(MODEL_REPO)/manifest.json: | $(VENV)/.installed
	$(BIN)/recserve export --out $(MODEL_REPO)

serve: $(VENV)/.installed $(MODEL_REPO)/manifest.json
	$(BIN)/recserve serve --model-repo $(MODEL_REPO) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Running servers of other stacks join the same run as peers (NAME=URL, space-separated), e.g. infinity
# on the same model file, started in another shell by benchmarks/peers/infinity.sh:
#   make bench BENCH_PEERS=infinity=openai+http://127.0.0.1:7997/embeddings
BENCH_PEERS ?=
bench: $(VENV)/.installed $(MODEL_REPO)/manifest.json
	$(BIN)/recserve bench suite --model-repo $(MODEL_REPO) --out benchmarks/results --markdown BENCHMARKS.md \
		$(foreach peer,$(BENCH_PEERS),--peer $(peer))

# Ten minutes at 0.7 of capacity with the mixed workload: leaks and drift. Not part of `make bench` or CI.
bench-soak: $(VENV)/.installed $(MODEL_REPO)/manifest.json
	$(BIN)/recserve bench soak --model-repo $(MODEL_REPO) --out benchmarks/soak --markdown benchmarks/soak/SOAK.md

# 1, 2 and 3 local replicas behind one round-robin client, then one replica's backlog under a load step and
# when the shipped HPA (deploy/) would have scaled: benchmarks/fleet/ (FLEET.md, fleet.json, backlog.png).
.PHONY: bench-fleet
bench-fleet: $(VENV)/.installed $(MODEL_REPO)/manifest.json
	$(BIN)/recserve bench fleet --model-repo $(MODEL_REPO) --out benchmarks/fleet

# Issue 14's GPU check (fp16 parity, batch invariance, IO binding, raw and served fp16 throughput) ->
# benchmarks/gpu/. NOTE: this venv holds the CPU onnxruntime; run it with a Python that has recserve and
# onnxruntime-gpu (the gpu extra, or the gpu image): `make gpu-check GPU_PYTHON=/opt/recserve/bin/python`.
# Without a CUDA provider or a GPU it refuses in one line (exit 2).
GPU_PYTHON ?= $(BIN)/python
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) -m recserve.cli bench gpu-check --model-repo $(MODEL_REPO) --out benchmarks/gpu

# The catalog build against the raw limit, and Recommend with and without rerank through a served server:
# benchmarks/recommend/ (RECOMMEND.md, recommend.json). Exports a random cross-encoder there once.
.PHONY: bench-recommend
bench-recommend: $(VENV)/.installed $(MODEL_REPO)/manifest.json
	$(BIN)/recserve bench recommend --model-repo $(MODEL_REPO) --out benchmarks/recommend

lint: $(VENV)/.installed
	$(BIN)/ruff check recserve tests
	$(BIN)/ruff format --check recserve tests
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

proto: $(VENV)/.installed
	$(BIN)/python -m recserve.protos

# The settings table in docs/serving.md is generated from ServerSettings; tests/test_docs.py checks it.
docs: $(VENV)/.installed
	$(BIN)/python -m recserve.server.command --settings-markdown --write docs/serving.md

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
