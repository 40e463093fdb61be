#!/usr/bin/env bash
# Fetch the Open Bandit Dataset sample (ZOZOTOWN; the 10,000-row-per-log
# sample that ships inside obp's source distribution) into a cache outside the
# work tree, and print its directory:
#
#   bash training/scripts/fetch_obd.sh [DIR]    # default ${ADSTACK_HOME:-~/.cache/adserve}/obd
#   python -m adserve_trainer.obd --data "$(bash training/scripts/fetch_obd.sh)" --out /tmp/obd-report
#
# Layout: DIR/{random,bts}/{all,men,women}/{<campaign>.csv,item_context.csv}.
# Re-running is a no-op once the files are there. obp 0.5.7 declares
# requires-python < 3.11; only its data is used here, so pip is told to
# ignore that (--ignore-requires-python) and never builds or installs it.
set -euo pipefail

home="${ADSTACK_HOME:-$HOME/.cache/adserve}"
dir="${1:-$home/obd}"
pip="$home/venv/bin/pip" # the trainer's venv (scripts/install.sh); any pip will do
[ -x "$pip" ] || pip="python3 -m pip"

have_all() {
  local p c
  for p in random bts; do
    for c in all men women; do
      [ -s "$dir/$p/$c/$c.csv" ] && [ -s "$dir/$p/$c/item_context.csv" ] || return 1
    done
  done
}

if ! have_all; then
  mkdir -p "$dir/sdist"
  if ! ls "$dir"/sdist/obp-0.5.7.tar.gz >/dev/null 2>&1; then
    echo "fetch_obd: pip download obp==0.5.7 (sdist) -> $dir/sdist" >&2
    $pip download --disable-pip-version-check --quiet --no-deps --no-binary=:all: --ignore-requires-python \
      obp==0.5.7 -d "$dir/sdist" >&2
  fi
  tmp="$(mktemp -d "$dir/.extract.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  tar -xzf "$dir/sdist/obp-0.5.7.tar.gz" -C "$tmp" --wildcards 'obp-0.5.7/obp/dataset/obd/*'
  for p in random bts; do
    for c in all men women; do
      mkdir -p "$dir/$p/$c"
      cp "$tmp/obp-0.5.7/obp/dataset/obd/$p/$c/"*.csv "$dir/$p/$c/"
    done
  done
  have_all || { echo "fetch_obd: error: the sdist does not hold every {random,bts}/{all,men,women} log" >&2; exit 1; }
  echo "fetch_obd: extracted $(find "$dir/random" "$dir/bts" -name '*.csv' | wc -l) CSV files" >&2
fi
echo "$dir"
