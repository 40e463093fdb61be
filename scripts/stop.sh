#!/usr/bin/env bash
# Stops what scripts/start.sh started: scripts/stop.sh [services|infra|all|adserve-NAME|kafka|dynamodb|redis] (default all).
#
# Only processes with a pid file in $ADSTACK_RUN/pids are stopped, and only if
# /proc/PID/cmdline still matches the expected program (pid reuse). Anything the
# start script reused (external Redis, system PostgreSQL, ...) is left alone.
# PostgreSQL is stopped only if start.sh started the cluster (marker file).
# SIGTERM, up to STOP_TIMEOUT (15) seconds, then SIGKILL. Services before infra.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$(dirname "$0")/env.sh"

what="${1:-all}"
case "$what" in
  services | infra | all) ;;
  -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  adserve-*) [[ " ${ADSTACK_SERVICES[*]} " == *" $what "* ]] || die "unknown service $what (one of: ${ADSTACK_SERVICES[*]})" ;;
  kafka | dynamodb | redis) ;;
  *) die "usage: $0 [services|infra|all|adserve-NAME|kafka|dynamodb|redis]" ;;
esac
STOP_TIMEOUT="${STOP_TIMEOUT:-15}"
failed=0

stop_one() {
  local name="$1" f pid i
  f="$(pid_file "$name")"
  if [ ! -f "$f" ]; then
    log "$name: no pid file, not started by us; leaving it alone"
    return 0
  fi
  if ! pid="$(owned_pid "$name")"; then
    log "$name: pid $(head -n1 "$f" 2>/dev/null || echo '?') from $f is gone or is no longer $(proc_pattern "$name"); removing the stale pid file, killing nothing"
    rm -f "$f"
    return 0
  fi
  log "$name: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    log "$name: still running after ${STOP_TIMEOUT} s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
  fi
  if pid_alive "$pid"; then
    log "$name: pid $pid survived SIGKILL; keeping $f"
    failed=1
    return 0
  fi
  rm -f "$f"
  log "$name: stopped"
}

stop_postgres() {
  local version cluster
  if [ ! -f "$PG_MARKER" ]; then
    log "postgres: not started by us; leaving it alone"
    return 0
  fi
  read -r version cluster <"$PG_MARKER" || true
  if [ -z "${version:-}" ] || [ -z "${cluster:-}" ]; then
    log "postgres: unreadable marker $PG_MARKER; removing it, stopping nothing"
    rm -f "$PG_MARKER"
    return 0
  fi
  log "postgres: stopping cluster $version/$cluster (we started it)"
  if pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" stop; then
    rm -f "$PG_MARKER"
    log "postgres: stopped"
  elif ! port_open "$PG_PORT"; then
    rm -f "$PG_MARKER"
    log "postgres: was not running any more"
  else
    log "postgres: pg_ctlcluster $version $cluster stop failed; keeping $PG_MARKER"
    failed=1
  fi
}

stop_services() {
  local i
  for ((i = ${#ADSTACK_SERVICES[@]} - 1; i >= 0; i--)); do
    stop_one "${ADSTACK_SERVICES[i]}"
  done
}

stop_infra() {
  stop_one dynamodb
  stop_one kafka
  stop_one redis
  stop_postgres
}

case "$what" in
  services) stop_services ;;
  infra) stop_infra ;;
  all) stop_services; stop_infra ;;
  adserve-* | kafka | dynamodb | redis) stop_one "$what" ;;
esac
exit "$failed"
