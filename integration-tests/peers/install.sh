#!/usr/bin/env bash
# Installs the Python benchmark peers (feast_peer.py, ort_fastapi.py) into their own venv,
# $ADSTACK_HOME/bench-venv, kept apart from the trainer venv ($ADSTACK_HOME/venv).
# Idempotent: creates the venv when missing and runs pip only when requirements.txt
# changed since the last successful install (sha256 stamp inside the venv).
#
#   bash integration-tests/peers/install.sh          # install, print the venv's python
#   . integration-tests/peers/install.sh && peers_install   # or source it and call the function
#
# Only PyPI is used. Takes ~40 s and ~650 MB on a fresh machine (pyarrow, onnxruntime,
# pandas and dask are most of it).

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../scripts/env.sh
. "$PEERS_DIR/../../scripts/env.sh"
PEERS_VENV="$ADSTACK_HOME/bench-venv"
PEERS_PYTHON="$PEERS_VENV/bin/python"

# peers_install: runs in a subshell so sourcing this file never changes the caller's
# shell options; prints the venv's python on success.
peers_install() (
  set -euo pipefail
  local req="$PEERS_DIR/requirements.txt" stamp="$PEERS_VENV/.requirements.sha" want
  [ -f "$req" ] || die "missing $req"
  mkdir -p "$ADSTACK_HOME"
  if [ ! -x "$PEERS_PYTHON" ]; then
    python3 -c 'import venv, ensurepip' 2>/dev/null ||
      die "python3-venv is missing (scripts/install.sh installs it)"
    log "creating venv $PEERS_VENV"
    rm -f "$stamp"
    python3 -m venv "$PEERS_VENV"
  fi
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "pip install integration-tests/peers/requirements.txt into $PEERS_VENV"
    "$PEERS_VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
  fi
  printf '%s\n' "$PEERS_PYTHON"
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  peers_install "$@"
fi
