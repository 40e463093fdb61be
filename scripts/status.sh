#!/usr/bin/env bash
# One line per component of the local stack: port(s), up/down, and whether
# scripts/start.sh started it (with its pid) or it is an external process.
# Usage: scripts/status.sh [--check]; with --check the exit status is 3 unless
# every component is up (0 otherwise, always).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$(dirname "$0")/env.sh"

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) die "usage: $0 [--check]" ;;
esac
all_up=0
printf '%-24s %-36s %-5s %s\n' COMPONENT PORTS STATE OWNER

# owner NAME UP: who runs it, from our pid file.
owner() {
  local name="$1" up="$2" pid
  if pid="$(owned_pid "$name")"; then
    if [ "$up" = up ]; then printf 'ours (pid %s)\n' "$pid"; else printf 'ours (pid %s), not listening\n' "$pid"; fi
  elif [ -f "$(pid_file "$name")" ]; then
    if [ "$up" = up ]; then printf 'external (stale pid file)\n'; else printf -- '- (stale pid file)\n'; fi
  elif [ "$up" = up ]; then
    printf 'external\n'
  else
    printf -- '-\n'
  fi
}

row() { # NAME PORTS STATE OWNER
  printf '%-24s %-36s %-5s %s\n' "$1" "$2" "$3" "$4"
  [ "$3" = up ] || all_up=3
}

for name in "${ADSTACK_INFRA[@]}"; do
  port="$(infra_port "$name")"
  state=down
  port_open "$port" && state=up
  if [ "$name" = postgres ]; then
    if [ -f "$PG_MARKER" ]; then
      who="ours (cluster $(tr ' ' / <"$PG_MARKER"))"
    elif [ "$state" = up ]; then
      who=external
    else
      who=-
    fi
  else
    who="$(owner "$name" "$state")"
  fi
  row "$name" "$port" "$state" "$who"
done

for name in "${ADSTACK_SERVICES[@]}"; do
  grpc="$(svc_port "$name" grpc)"
  metrics="$(svc_port "$name" metrics)"
  ports="grpc $grpc, metrics $metrics"
  state=down
  port_open "$grpc" && state=up
  if [ "$name" = adserve-gateway ]; then
    ports="http $GATEWAY_HTTP_PORT, $ports"
    if [ "$state" = up ]; then
      code="$(http_status "$GATEWAY_HTTP_PORT" /healthz)" || code=""
      [ "$code" = 200 ] || state=down
    fi
  fi
  row "$name" "$ports" "$state" "$(owner "$name" "$state")"
done
if [ "$check" = 1 ]; then exit "$all_up"; fi
