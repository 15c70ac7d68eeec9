# Two entry points (README Quickstart): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,tune,test]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m pock_tvm.cli.main demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py --out benchmarks/results
	$(PY) benchmarks/bench_optimizations.py --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
