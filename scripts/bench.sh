#!/usr/bin/env bash
# Runs the benchmarks: scripts/bench.sh (via `make bench`, `make bench QUICK=1`,
# `make bench-<part>`).
#
# 1. Installs the peers' Python venv (Feast, FastAPI + onnxruntime).
# 2. Builds the services and the driver with the release profile (thin LTO).
# 3. Runs the criterion benches of the parts asked for (in-process figures):
#    the auction, and the ranker's gather.
# 4. Starts the infrastructure the way `make demo` does, and the five services
#    from the release build (restarting ours if they run another build). The
#    stack's own label-joiner is then stopped, and the feature-service runs
#    with mode = serve: both would consume the bench's events and compete for
#    the cores; the joiner and aggregates parts start their own.
# 5. Runs adserve-bench, which prints the table and writes JSON (and, for full
#    runs or BENCH_DOCS=1, the generated section of docs/benchmarks.md).
# 6. Stops the release services, so `make demo` / `make test` start their own,
#    and, when scripts/start.sh runs the broker (tansu, in memory), restarts it
#    empty: the label-joiner bench filled it with ~250k synthetic events that
#    every fresh consumer group would otherwise have to read first.
#
# Environment:
#   BENCH_QUICK=1        short windows (< 5 minutes once built)
#   BENCH_PARTS=a,b      only these parts: auction, ranker, ranker-overload, ranker-swap, tls, features, e2e, joiner, aggregates
#   BENCH_DOCS=1         write docs/ even for a quick or partial run
#   ADSTACK_MODEL_DIR    the model the stack's ranker serves (not the registry's
#                        production version) and the ranker parts measure
#                        (default models/ctr-baseline); e.g.
#                        models/ctr-dcnv2-typed for the DCN-v2 with an int64 input
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$(dirname "$0")/env.sh"
cd "$ADSTACK_REPO"
# The stack's ranker (scripts/start.sh) and every part score the same model:
# ADSTACK_MODEL_DIR (default the committed baseline), not whatever the model
# registry has in production (after `make demo`, the demo's DCN-v2).
ADSTACK_MODEL_DIR="$(realpath "${ADSTACK_MODEL_DIR:-models/ctr-baseline}")"
export ADSTACK_MODEL_DIR ADSTACK_RANKER_REGISTRY=false

quick="${BENCH_QUICK:-0}"
all_parts="auction,ranker,ranker-overload,ranker-swap,tls,features,e2e,joiner,aggregates"
parts="${BENCH_PARTS:-$all_parts}"
export ADSTACK_PROFILE=release
work="$ADSTACK_RUN/bench"
mkdir -p "$work/logs"

bash integration-tests/peers/install.sh

log "cargo build --release (services and adserve-bench; CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
build_args=(build --release)
for s in "${ADSTACK_SERVICES[@]}"; do build_args+=(--bin "$s"); done
build_args+=(--bin adservectl)
cargo "${build_args[@]}" --bin adserve-bench

# A part's in-process figures: criterion bench <bench> of package <package>,
# which the driver reads from criterion's estimates.
criterion() {
  local package=$1 bench=$2 crit=()
  [ "$quick" = 1 ] && crit=(--warm-up-time 1 --measurement-time 2)
  log "criterion: cargo bench -p $package --bench $bench"
  cargo bench -p "$package" --bench "$bench" -- "${crit[@]}" >"$work/logs/criterion-$bench.log" 2>&1 ||
    die "criterion bench failed; see $work/logs/criterion-$bench.log"
}
if [[ ",$parts," == *",auction,"* ]]; then criterion adserve-auction auction; fi
if [[ ",$parts," == *",ranker,"* ]]; then criterion adserve-ranker gather; fi

bash scripts/start.sh infra
# Our services may be running a debug build (make demo / make test): restart them.
# The feature-service only serves: its streaming aggregates would consume every
# part's synthetic events and compete for the cores (the aggregates part runs
# an aggregator of its own).
bash scripts/stop.sh services
ADSTACK_FEATURES_MODE=serve ADSTACK_SKIP_BUILD=1 bash scripts/start.sh services
for s in "${ADSTACK_SERVICES[@]}"; do
  owned_pid "$s" >/dev/null ||
    die "$s: port $(svc_port "$s" grpc) is held by a process scripts/start.sh did not start; stop it so the release build is what gets measured"
done
cleanup() {
  bash scripts/stop.sh services >/dev/null 2>&1 || true
  if owned_pid kafka >/dev/null; then
    log "restarting the in-memory broker empty (the bench filled it with synthetic events)"
    bash scripts/stop.sh kafka >/dev/null 2>&1 && bash scripts/start.sh infra >/dev/null 2>&1 || true
  else
    log "warning: the broker on port $KAFKA_PORT is not ours; the bench's synthetic events stay in its topics"
  fi
}
trap cleanup EXIT
bash scripts/stop.sh adserve-label-joiner

args=(--json "$work/results.json" --work-dir "$work" --bin-dir "$CARGO_TARGET_DIR/release" --profile release
  --peer-python "$ADSTACK_HOME/bench-venv/bin/python" --only "$parts")
args+=(--model-dir "$ADSTACK_MODEL_DIR")
command="make bench"
[ "$quick" = 1 ] && { args+=(--quick); command="make bench QUICK=1"; }
if [ "$parts" != "$all_parts" ]; then
  # (An assignment takes its status from the substitution: a bare
  # `[ quick ] && echo` failed it, and set -e ended every non-quick partial run.)
  suffix=""
  [ "$quick" = 1 ] && suffix=" QUICK=1"
  command="make bench-${parts//,/+}$suffix"
fi
if [ "${BENCH_DOCS:-0}" = 1 ] || { [ "$quick" != 1 ] && [ "$parts" = "$all_parts" ]; }; then
  args+=(--doc docs/benchmarks.md)
  cp_json=1
fi
"$CARGO_TARGET_DIR/release/adserve-bench" "${args[@]}" --command "$command"
if [ "${cp_json:-0}" = 1 ]; then
  cp "$work/results.json" docs/benchmarks.json
  log "wrote docs/benchmarks.md (generated section) and docs/benchmarks.json"
fi
