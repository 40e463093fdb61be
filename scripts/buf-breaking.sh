#!/usr/bin/env bash
# Fails when proto/ breaks wire or source compatibility with the last commit of
# main: on main that is the previous commit (HEAD~1), elsewhere main's tip.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ADSTACK_REPO"
BUF="$ADSTACK_HOME/buf/node_modules/.bin/buf"
branch="$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo HEAD)"
if [ "$branch" = main ]; then ref="HEAD~1"; else ref="main"; fi
if ! git rev-parse -q --verify "$ref^{commit}" >/dev/null; then
  log "buf breaking: no $ref to compare against (first commit or shallow clone); skipped"
  exit 0
fi
if ! git cat-file -e "$ref:proto/buf.yaml" 2>/dev/null; then
  log "buf breaking: $ref has no proto/ module yet; skipped"
  exit 0
fi
log "buf breaking: proto/ against $ref"
"$BUF" breaking proto --against ".git#ref=$(git rev-parse "$ref"),subdir=proto"
