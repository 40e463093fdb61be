#!/usr/bin/env bash
# `make demo`: the whole feedback loop on the local stack, end to end.
#
#   1. start the stack (scripts/start.sh all; binaries already built)
#   2. bootstrap: train a first model on the trainer's synthetic generator
#      (no training rows exist yet), register it, promote it to production;
#      the running ranker swaps it in; adserve-demo serves ads and clicks
#      and shows the Parquet rows the label-joiner wrote
#   3. simulate: adserve-sim drives the gateway with a seeded world whose
#      click truth is known (clicks posted late, some after the label window)
#      and waits for the label-joiner's rows
#   4. train on those rows (DCN-v2 and the LR baseline), scored against the
#      simulator's oracle (its true probabilities)
#   5. gate: the candidate against production on the same holdout -> shadow
#   6. promote the candidate to production; the ranker serves it
#
# Knobs (environment): ADSTACK_SIM_REQUESTS (default 40000: the gate judges
# calibration on the last 10 %, and at 2 000 rows label noise alone is about the
# gate's 2 % ECE bar), ADSTACK_SIM_SEED
# (default 42), ADSTACK_SIM_CONCURRENCY (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

bin="$CARGO_TARGET_DIR/debug"
py="$ADSTACK_VENV/bin/python"
parquet="$(realpath -m "${ADSTACK_PARQUET_DIR:-$ADSTACK_RUN/parquet}")"
stamp="$(date -u +%Y%m%d%H%M%S)"
step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }

step "1/6 the local stack"
ADSTACK_SKIP_BUILD=1 bash scripts/start.sh all

step "2/6 bootstrap model (synthetic rows: nothing has been served yet)"
boot="ctr-dcnv2-demo-$stamp"
boot_dir="$ADSTACK_RUN/models/$boot"
(cd training && "$py" -m adserve_trainer.train --synthetic 20000 --seed 11 --version "$boot" --out "$boot_dir")
"$bin/adservectl" models register --dir "$boot_dir"
"$bin/adservectl" models promote --version "$boot" --to production --reason "make demo: bootstrap model"
"$bin/adserve-demo" --expect-model "$boot"

step "3/6 simulate: a world with known click truth drives the gateway"
sim_dir="$ADSTACK_RUN/sim/$stamp"
"$bin/adserve-sim" --out "$sim_dir" --label-window "$ADSTACK_LABEL_WINDOW" \
  --seed "${ADSTACK_SIM_SEED:-42}" --requests "${ADSTACK_SIM_REQUESTS:-40000}" \
  --concurrency "${ADSTACK_SIM_CONCURRENCY:-4}"

step "4/6 train on the label-joiner's rows, scored against the oracle"
cand="ctr-dcnv2-sim-$stamp"
cand_dir="$ADSTACK_RUN/models/$cand"
(cd training && "$py" -m adserve_trainer.train --data "$parquet" --truth "$sim_dir/truth.csv" \
  --version "$cand" --out "$cand_dir")
"$bin/adservectl" models register --dir "$cand_dir"

step "5/6 promotion gate: $cand against production ($boot) on the same holdout"
gate_rc=0
(cd training && "$py" -m adserve_trainer.gate --candidate "$cand_dir" --data "$parquet" \
  --truth "$sim_dir/truth.csv" --adservectl "$bin/adservectl") || gate_rc=$?
if [ "$gate_rc" -ne 0 ]; then
  die "the candidate did not pass the gate (exit $gate_rc; $cand_dir/gate.json): production stays $boot"
fi

step "6/6 promote $cand to production; the running ranker swaps it in"
"$bin/adservectl" models promote --version "$cand" --to production \
  --reason "make demo: passed the gate ($cand_dir/gate.json)"
"$bin/adserve-demo" --expect-model "$cand" --requests 40
"$bin/adservectl" models list | head -4

"$py" - "$cand_dir/report.json" "$sim_dir/sim.json" "$cand_dir/gate.json" <<'EOF'
import json, sys
report, sim, gate = (json.load(open(p)) for p in sys.argv[1:])
oracle = report["oracle"]["auc"]
print("\n== the loop, on the evaluation rows of the simulated traffic")
print(f"   oracle (true probability as the score)  auc {oracle:.4f}")
for name, m in report["models"].items():
    print(
        f"   {name:6s} auc {m['auc']:.4f} = {m['auc_vs_oracle']:.3f} x oracle   "
        f"ece {m['ece']:.4f}   calibration error vs truth {m['calibration_vs_truth']:.4f}"
    )
print(f"   simulated: {sim['impressions']} impressions, {sim['clicks_sent']} clicks sent "
      f"({sim['clicks_after_window']} after the label window), {sim['rows_joined']} rows joined")
print(f"   gate: {gate['decision']}: {gate['reason']}")
EOF
