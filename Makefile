# One-command set-up: `make demo` and `make test` create .venv in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint format test demo bench clean

install: $(STAMP)

# torch is pinned to the CPU build here only; setup.cfg declares it loosely
# because SpecForge pins its own torch.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff format --check specforge_vocab tests benchmarks scripts
	$(VENV)/bin/ruff check specforge_vocab tests benchmarks scripts

format: install
	$(VENV)/bin/ruff format specforge_vocab tests benchmarks scripts
	$(VENV)/bin/ruff check --fix specforge_vocab tests benchmarks scripts

test: lint
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/specforge-vocab demo --output-dir outputs/demo

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs build *.egg-info
