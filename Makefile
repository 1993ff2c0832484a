# sdflow: `make demo` runs the pipeline on the built-in demo data; `make test` runs the tests.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= ./sdflow-work
PYTEST_ARGS ?=
# Test processes: the tests are single-threaded (one torch thread each), so one per core; a file's
# tests stay in one process, where its module fixtures (a trained run, a sweep) are built once, and
# the files go out in collection order, the longest first (tests/conftest.py: LONGEST_FIRST).
TEST_WORKERS ?= 2

.PHONY: install demo test docs-check lint format bench clean ui

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev,dask,caption,kubernetes,quantize]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdflow demo --workdir $(WORKDIR)

ui: $(STAMP)
	$(BIN)/sdflow server --workdir $(WORKDIR)

# docs-check first: the docs name only profile keys, files, modules and bench options that exist
# (tools/docs_check.py; it runs each named bench script with --help).
test: $(STAMP) docs-check
	DO_NOT_TRACK=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

docs-check: $(STAMP)
	$(BIN)/python tools/docs_check.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmarks that run on a CPU machine; img2dataset (the `bench` extra) is the download peer.
# Each bench leaves its comparison in $(BENCH_RESULTS) (bench/results.py); bench/summary.py prints
# them as one table. A new bench joins with a `$(BENCH) bench/<name>.py` line before the summary.
BENCH_RESULTS ?= $(CURDIR)/bench-results
BENCH := SDFLOW_BENCH_RESULTS=$(BENCH_RESULTS) $(BIN)/python

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	# img2dataset pulls the Python 3.6 `dataclasses` backport, which shadows the standard library in
	# some child processes (pydantic then fails to import): it is never needed on Python >= 3.7
	$(BIN)/pip uninstall --quiet -y dataclasses 2>/dev/null || true
	rm -rf $(BENCH_RESULTS)
	$(BENCH) bench/startup.py
	$(BENCH) bench/download.py --images 5000 --repeats 3 --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download.py --images 5000 --repeats 3 --small-host --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download.py --images 5000 --repeats 3 --shard-processes --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download.py --images 5000 --repeats 3 --shard-processes --small-host --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download.py --images 5000 --repeats 3 --per-host 16 --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download.py --images 5000 --repeats 3 --per-host 16 --small-host --image-cache $(BENCH_RESULTS)/images
	$(BENCH) bench/download_mix.py --images 2000 --repeats 3
	$(BENCH) bench/image_format.py
	OMP_NUM_THREADS=1 $(BENCH) bench/train_step.py --vs-reference --repeats 5
	# with a diffusers checkout: REFERENCE_SCRIPT=.../examples/text_to_image/train_text_to_image.py
	test -z "$(REFERENCE_SCRIPT)" || $(BENCH) bench/train_step.py --vs-reference --repeats 5 \
		--steps 200 --warmup 10 --threads 1 --reference-script $(REFERENCE_SCRIPT)
	$(BENCH) bench/data_scale.py --rows 2000 20000
	$(BENCH) bench/flow_scale.py --rows 20000
	$(BENCH) bench/bookkeeping.py --rows 1000000 10000000
	$(BIN)/python bench/summary.py $(BENCH_RESULTS)

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache $(BENCH_RESULTS)
