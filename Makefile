# `make run` and `make test` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test stress-test bench typecheck venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) examples/demo.py

# No reruns: a test that fails once is a failure. PYTEST_ARGS passes more options (e.g. --deselect).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The same suite while two busy loops (one per core of the reference machine) compete for the CPU:
# timing guesses fail here. The target starts the loops and kills them however pytest ends.
stress-test: $(STAMP)
	@sh -c 'while :; do :; done' & a=$$!; \
	sh -c 'while :; do :; done' & b=$$!; \
	trap 'kill $$a $$b 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM; \
	echo "stress-test: busy loops $$a $$b"; \
	$(PY) -m pytest -q $(PYTEST_ARGS)

# mypy --strict and pyright over sandpool/ and the typed examples (the paths and modes are in
# pyproject.toml); both must report 0 errors.
typecheck: $(STAMP)
	@$(PY) -m mypy; m=$$?; $(VENV)/bin/pyright; p=$$?; exit $$((m || p))

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info
