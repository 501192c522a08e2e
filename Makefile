# The two commands of the README: `make demo` (the product end to end on local
# defaults) and `make test` (the whole suite). Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

# Two pytest workers, whole files each (module fixtures built once), heaviest files first
# (tests/conftest.py orders them): on 2 cores one worker computes while the other waits on Ray.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) -m bench.bench_step

clean:
	rm -rf $(VENV) demo_out .pytest_cache
