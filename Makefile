# adserve: `make demo` runs the whole loop end to end; `make test` runs every test.
# Both install what is missing first (scripts/install.sh) and reuse what runs.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ENV := source scripts/env.sh &&
CARGO_TEST_ENV := ADSTACK_TEST_POSTGRES_URL=postgres://adserve:adserve@127.0.0.1:5432/adserve

.PHONY: help install build up down status model train gate demo test test-python test-rust test-helm proto-check lint fmt bench \
	bench-e2e bench-features bench-ranker bench-ranker-overload bench-ranker-swap bench-tls bench-auction bench-joiner bench-aggregates

help:
	@echo "make demo    install, start the stack, then the loop: bootstrap model, simulate, join, train, gate, promote, serve"
	@echo "make test    install, start the stack, run buf, Python and Rust tests"
	@echo "make up | down | status    start / stop / inspect the local stack (scripts/)"
	@echo "make model   regenerate the committed models (models/ctr-baseline, models/ctr-dcnv2-typed)"
	@echo "make train   train on the label-joiner's rows (DATA=dir, default \$$ADSTACK_RUN/parquet; OUT=dir; MODEL=dcnv2|lr)"
	@echo "make gate    promotion gate: CANDIDATE=dir vs production on DATA's holdout -> shadow or retired (DRY_RUN=1, PRODUCTION=dir)"
	@echo "make lint    rustfmt --check, clippy -D warnings, cargo-deny (licences, bans, sources), cargo-machete (make proto-check: buf lint + breaking)"
	@echo "make bench   release build, every benchmark next to its peer (QUICK=1: < 5 min; bench-<part>: one part)"

install:
	bash scripts/install.sh

build: install
	$(ENV) cargo build --workspace --bins

up: build
	ADSTACK_SKIP_BUILD=1 bash scripts/start.sh all

down:
	bash scripts/stop.sh all

status:
	bash scripts/status.sh

# The committed models: the LR baseline (the ranker's default and fallback,
# dense features only) and a DCN-v2 that also takes the registry's categorical
# ids as an int64 input (the typed-input fixture of the ranker's tests). Each
# reference.json is re-made from fixed synthetic rows (varied categorical ids)
# so that the committed files are reproducible.
model: install
	$(ENV) cd training && "$$ADSTACK_VENV/bin/python" -m adserve_trainer.train --synthetic 20000 --seed 7 \
		--model lr --calibration none --version ctr-baseline-v1 --out ../models/ctr-baseline && \
		rm -f ../models/ctr-baseline/report.json ../models/ctr-baseline/calibration.png && \
		"$$ADSTACK_VENV/bin/python" -m adserve_trainer.export --reference ../models/ctr-baseline && \
		"$$ADSTACK_VENV/bin/python" -m adserve_trainer.train --synthetic 20000 --seed 7 --epochs 8 \
		--model dcnv2 --calibration platt --version ctr-dcnv2-typed-v1 --out ../models/ctr-dcnv2-typed && \
		rm -f ../models/ctr-dcnv2-typed/report.json ../models/ctr-dcnv2-typed/calibration.png && \
		"$$ADSTACK_VENV/bin/python" -m adserve_trainer.export --reference ../models/ctr-dcnv2-typed

# Retrain from the label-joiner's Parquet rows (DATA, default the local stack's
# joiner output dir) into OUT (default $ADSTACK_RUN/models/<version>): model.onnx,
# manifest.json, report.json, calibration.png. Register it with
# `adservectl models register --dir OUT`. MODEL=lr exports the LR baseline.
MODEL ?= dcnv2
train: install
	$(ENV) data="$(DATA)" && data="$$(realpath -m "$${data:-$${ADSTACK_PARQUET_DIR:-$$ADSTACK_RUN/parquet}}")" && \
		version="$(VERSION)" && version="$${version:-ctr-$(MODEL)-$$(date -u +%Y%m%d%H%M%S)}" && \
		out="$(OUT)" && out="$$(realpath -m "$${out:-$$ADSTACK_RUN/models/$$version}")" && \
		cd training && "$$ADSTACK_VENV/bin/python" -m adserve_trainer.train --data "$$data" --model "$(MODEL)" \
			--version "$$version" --out "$$out"

# The promotion gate (training/README.md): score CANDIDATE (a registered model
# directory) and the registry's production model on the same holdout of DATA
# (default as for train); promote CANDIDATE to shadow if it passes, retire it
# if not. PRODUCTION=dir scores that model instead of the registry's; DRY_RUN=1
# leaves the registry alone. Exit status 1: refused; 2: error.
gate: install
	$(ENV) test -n "$(CANDIDATE)" || { echo "make gate: CANDIDATE=<model dir> is required" >&2; exit 2; } && \
		data="$(DATA)" && data="$$(realpath -m "$${data:-$${ADSTACK_PARQUET_DIR:-$$ADSTACK_RUN/parquet}}")" && \
		candidate="$$(realpath -m "$(CANDIDATE)")" && \
		production="$(PRODUCTION)" && production="$${production:+$$(realpath -m "$$production")}" && \
		cd training && "$$ADSTACK_VENV/bin/python" -m adserve_trainer.gate --candidate "$$candidate" --data "$$data" \
			$${production:+--production "$$production"} $(if $(DRY_RUN),--dry-run) \
			--adservectl "$$CARGO_TARGET_DIR/debug/adservectl"

# The whole feedback loop (scripts/demo.sh): the stack; a bootstrap model
# trained on synthetic rows and promoted through the registry; a simulated
# world of known click truth driving the gateway (adserve-sim); training on the
# label-joiner's rows, scored against the simulator's oracle; the promotion
# gate; the candidate promoted and served by the running ranker.
demo: build
	bash scripts/demo.sh

proto-check: install
	$(ENV) "$$ADSTACK_HOME/buf/node_modules/.bin/buf" lint proto
	$(ENV) bash scripts/buf-breaking.sh

test-python: install
	$(ENV) "$$ADSTACK_VENV/bin/python" -m pytest training/tests -q

test-rust: install
	$(ENV) cargo build --workspace --all-targets
	$(ENV) ADSTACK_SKIP_BUILD=1 bash scripts/start.sh all
	$(ENV) $(CARGO_TEST_ENV) cargo test --workspace --no-fail-fast

# The Helm chart rendered with several value sets, and every service's rendered
# config.toml checked by the service binary itself (--check-config).
test-helm: install
	$(ENV) "$$ADSTACK_HOME/helm-venv/bin/python" -m pytest helm/tests -q

test: lint proto-check test-python test-rust test-helm

fmt:
	cargo fmt --all

# Advisories (RustSec) need the network: run `cargo deny check advisories` where
# it is allowed. Here: licences, bans and sources, then unused dependencies.
lint: install
	cargo fmt --all -- --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	@# The ranker's other provider builds (the default has cuda and tensorrt):
	@# CUDA only, and CPU only, so their cfg paths compile and lint too.
	$(ENV) cargo clippy -p adserve-ranker --all-targets --no-default-features --features cuda -- -D warnings
	$(ENV) cargo clippy -p adserve-ranker --all-targets --no-default-features -- -D warnings
	$(ENV) "$$ADSTACK_TOOLS/bin/cargo-deny" check --hide-inclusion-graph licenses bans sources
	$(ENV) "$$ADSTACK_TOOLS/bin/cargo-machete"

# Benchmarks (scripts/bench.sh): release build, the stack on release binaries,
# every path next to its peer or floor in one run. QUICK=1 for short windows.
BENCH_ENV := BENCH_QUICK=$(if $(QUICK),1,0) BENCH_DOCS=$(if $(DOCS),1,0)

bench: install
	$(ENV) $(BENCH_ENV) bash scripts/bench.sh

bench-e2e bench-features bench-ranker bench-ranker-overload bench-ranker-swap bench-tls bench-auction bench-joiner bench-aggregates: install
	$(ENV) $(BENCH_ENV) BENCH_PARTS=$(patsubst bench-%,%,$@) bash scripts/bench.sh
