# The README's commands. `make demo` and `make test` set themselves up on a fresh clone.
#
# torch is installed first, pinned by TORCH_SPEC, so that `pip install -e .` finds it already
# satisfied and never pulls another build. On this project's CI machines torch 2.13.0 (CPU) lies
# on disk; on a CUDA machine the same pin gets the normal CUDA wheel from PyPI. Override with
# e.g. `make test TORCH_SPEC="torch==2.11.0"` or `TORCH_SPEC=` to keep whatever is installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Every extra, so that `make test` exercises every feature (structured output's tests skip
# without xgrammar).
EXTRAS ?= dev,serve,data,train,eval,structured
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.tulu-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	# The TGI client's pins conflict with transformers 5 (see pyproject.toml); its code does not.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "text-generation>=0.7"
	touch $@

demo: setup
	$(BIN)/tulu demo --output runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
