#!/usr/bin/env bash
# Starts the local adserve stack: scripts/start.sh [infra|services|all] (default all).
#
# Idempotent: infrastructure whose port already answers is reused and left alone;
# an adserve service on its port is reused only when it runs this checkout's
# binary (GET /buildinfo gives its pid; /proc/PID/exe must be the same file),
# restarted when it is another build, and refused when the port holder is not
# that service. A pid file ($ADSTACK_RUN/pids/NAME.pid) is written only for
# processes this script started, so scripts/stop.sh stops exactly those.
# Logs: $ADSTACK_RUN/logs/NAME.log.
#
# Environment (besides the ports in scripts/env.sh):
#   ADSTACK_PROFILE=debug|release|<profile>  which build of the services to run
#   ADSTACK_SKIP_BUILD=1                    do not run cargo build first
#   ADSTACK_MODEL_DIR                       ranker model (default <repo>/models/ctr-baseline)
#   ADSTACK_RANKER_REGISTRY                 true (default): the ranker follows the model
#                                           registry; false: it serves ADSTACK_MODEL_DIR only
#   ADSTACK_PARQUET_DIR                     label-joiner output (default $ADSTACK_RUN/parquet)
#   ADSTACK_LABEL_WINDOW                    label-joiner join window (default 5s; the
#                                           registry's production window is 30 min)
#   ADSTACK_PUBLISH_TIMEOUT                 the gateway's impression log timeout (default
#                                           1s: the local broker shares two cores with
#                                           everything; production's default is 150ms)
#   ADSTACK_REQUEST_BUDGET                  the gateway's deadlines.request (default 1500ms)
#   ADSERVE_TELEMETRY__LOG_FILTER           service log filter (default info,ort=warn)
#   DYNAMODB_JAVA_OPTS                      JVM options for DynamoDB Local
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$(dirname "$0")/env.sh"

what="${1:-all}"
case "$what" in
  infra | services | all) ;;
  -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "usage: $0 [infra|services|all]" ;;
esac
mkdir -p "$ADSTACK_PIDS" "$ADSTACK_LOGS"

SUMMARY=() # "component|address|state" rows for the final table
note() { SUMMARY+=("$1|$2|$3"); }

log_file() { printf '%s/%s.log\n' "$ADSTACK_LOGS" "$1"; }

# Keep the previous run's log as NAME.log.prev, start a fresh one.
fresh_log() {
  local f
  f="$(log_file "$1")"
  [ -f "$f" ] && mv -f "$f" "$f.prev"
  printf '=== %s started by scripts/start.sh at %s ===\n' "$1" "$(date -Is)" >"$f"
}

log_tail() {
  local f
  f="$(log_file "$1")"
  printf '%s\n' "--- last 30 lines of $f ---" >&2
  tail -n 30 "$f" >&2 || true
  printf '%s\n' "---" >&2
}

# launch NAME CMD...: runs CMD detached (own session, stdin closed, output to the
# log), records its pid. Every wrapper (env, nohup, setsid) execs, so $! is the
# pid of the real process.
launch() {
  local name="$1"
  shift
  fresh_log "$name"
  nohup setsid "$@" >>"$(log_file "$name")" 2>&1 </dev/null &
  local pid=$!
  printf '%s\n' "$pid" >"$(pid_file "$name")"
  log "$name: started, pid $pid, log $(log_file "$name")"
}

# await NAME PORT SECONDS: waits until PORT opens; dies early (with the log tail)
# if the process we started exits.
await() {
  local name="$1" port="$2" secs="$3" i pid
  # By pid only: until the launched child has exec'd, its cmdline is still ours.
  pid="$(head -n1 "$(pid_file "$name")")"
  for ((i = 0; i < secs * 10; i++)); do
    port_open "$port" && return 0
    if ! pid_alive "$pid"; then
      rm -f "$(pid_file "$name")"
      log_tail "$name"
      die "$name exited before opening 127.0.0.1:$port"
    fi
    sleep 0.1
  done
  log_tail "$name"
  die "$name (pid $pid) did not open 127.0.0.1:$port within $secs s; it is still running, scripts/stop.sh stops it"
}

# reuse_or_prepare NAME PORT: returns 0 (and records the reuse) if PORT already
# answers; otherwise clears a stale pid file and returns 1 so the caller starts it.
# A process of ours that is alive but not yet listening is waited for, not doubled.
reuse_or_prepare() { # NAME PORT [ADDRESS-LABEL]
  local name="$1" port="$2" addr="${3:-127.0.0.1:$2}" pid
  if pid="$(owned_pid "$name")" && ! port_open "$port"; then
    log "$name: our pid $pid is running but 127.0.0.1:$port is not open yet; waiting"
    await "$name" "$port" 60
  fi
  if port_open "$port"; then
    if pid="$(owned_pid "$name")"; then
      log "$name: already running on 127.0.0.1:$port (started by us earlier, pid $pid)"
      note "$name" "$addr" "running, ours (pid $pid)"
    else
      log "$name: 127.0.0.1:$port is already open; reusing the external process (stop.sh leaves it alone)"
      note "$name" "$addr" "reused (external)"
    fi
    return 0
  fi
  if [ -f "$(pid_file "$name")" ]; then
    log "$name: removing stale pid file"
    rm -f "$(pid_file "$name")"
  fi
  return 1
}

# ------------------------------------------------------------------ infra

start_redis() {
  reuse_or_prepare redis "$REDIS_PORT" && return 0
  command -v redis-server >/dev/null || die "redis-server not found (run scripts/install.sh)"
  launch redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize no
  await redis "$REDIS_PORT" 20
  note redis "127.0.0.1:$REDIS_PORT" "started (pid $(owned_pid redis))"
}

# psql as the database superuser: the postgres OS user over the local socket, or
# (if that is impossible, e.g. not root) user postgres over TCP.
PG_ADMIN_MODE=""
pg_admin() {
  if [ -z "$PG_ADMIN_MODE" ]; then
    if (cd / && runuser -u postgres -- psql -p "$PG_PORT" -d postgres -qAtc 'select 1') >/dev/null 2>&1; then
      PG_ADMIN_MODE=runuser
    elif psql -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qAtc 'select 1' >/dev/null 2>&1; then
      PG_ADMIN_MODE=tcp
    else
      die "cannot connect to PostgreSQL as superuser (tried 'runuser -u postgres -- psql' and 'psql -U postgres -h 127.0.0.1'); run as root, or set PGPASSWORD for user postgres"
    fi
  fi
  if [ "$PG_ADMIN_MODE" = runuser ]; then
    (cd / && runuser -u postgres -- psql -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -qAt "$@")
  else
    psql -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"
  fi
}

pg_login_check() { # prints psql's error on failure
  { PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 psql -w -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DATABASE" -qAtc 'select 1' >/dev/null; } 2>&1
}

# Adds "host all $PG_USER 127.0.0.1/32 <method>" before the first host line of
# the cluster's pg_hba.conf (once; backup kept as pg_hba.conf.adserve-bak), reloads.
pg_hba_allow() {
  local hba method line tmp
  hba="$(pg_admin -c 'show hba_file')"
  if [ ! -f "$hba" ] || [ ! -w "$hba" ]; then
    die "TCP login as $PG_USER fails and $hba is not writable here; add 'host all $PG_USER 127.0.0.1/32 scram-sha-256' before the other host lines yourself and reload PostgreSQL"
  fi
  # scram-sha-256 when passwords are stored that way (the default); md5 otherwise
  # (an md5 line also accepts scram-stored passwords, not the reverse).
  method="$(pg_admin -c 'show password_encryption')"
  [ "$method" = scram-sha-256 ] || method=md5
  line="host    all    $PG_USER    127.0.0.1/32    $method    # added by adserve scripts/start.sh"
  if grep -qF "# added by adserve scripts/start.sh" "$hba"; then
    log "postgres: $hba already has our line; not adding it again"
  else
    [ -f "$hba.adserve-bak" ] || cp -p "$hba" "$hba.adserve-bak"
    tmp="$(mktemp)"
    awk -v l="$line" '!done && /^[ \t]*host(ssl|nossl|gssenc|nogssenc)?[ \t]/ { print l; done = 1 } { print } END { if (!done) print l }' "$hba" >"$tmp"
    cat "$tmp" >"$hba" # keeps the file's owner and mode
    rm -f "$tmp"
    log "postgres: CHANGED $hba: added '$line' before the other host lines (backup: $hba.adserve-bak)"
  fi
  pg_admin -c 'select pg_reload_conf()' >/dev/null
  log "postgres: CHANGED configuration reloaded (pg_reload_conf)"
  sleep 1
}

start_postgres() {
  local cluster="" err
  command -v psql >/dev/null || die "psql not found (run scripts/install.sh)"
  if port_open "$PG_PORT"; then
    if [ -f "$PG_MARKER" ]; then
      log "postgres: already running on 127.0.0.1:$PG_PORT (cluster $(cat "$PG_MARKER"), started by us earlier)"
      note postgres "127.0.0.1:$PG_PORT" "running, ours (cluster $(tr ' ' / <"$PG_MARKER"))"
    else
      log "postgres: 127.0.0.1:$PG_PORT is already open; reusing the external server (stop.sh leaves it alone)"
      note postgres "127.0.0.1:$PG_PORT" "reused (external)"
    fi
  else
    command -v pg_ctlcluster >/dev/null || die "pg_ctlcluster not found (run scripts/install.sh)"
    if [ -d /etc/postgresql ]; then
      cluster="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
    fi
    if [ -z "$cluster" ] || [ ! -d "/etc/postgresql/$cluster/main" ]; then
      die "no PostgreSQL cluster under /etc/postgresql (run scripts/install.sh)"
    fi
    local conf_port
    conf_port="$(sed -n 's/^[ \t]*port[ \t]*=[ \t]*\([0-9]*\).*/\1/p' "/etc/postgresql/$cluster/main/postgresql.conf" | tail -n1)"
    [ "${conf_port:-5432}" = "$PG_PORT" ] || die "cluster $cluster/main is configured for port ${conf_port:-5432}, not PG_PORT=$PG_PORT"
    log "postgres: starting the system cluster $cluster/main (pg_ctlcluster)"
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start ||
      die "pg_ctlcluster $cluster main start failed (see /var/log/postgresql/postgresql-$cluster-main.log)"
    printf '%s main\n' "$cluster" >"$PG_MARKER"
    wait_port "$PG_PORT" 30 postgres
    note postgres "127.0.0.1:$PG_PORT" "started (cluster $cluster/main)"
  fi

  # Role and database (idempotent).
  if [ "$(pg_admin -c "select 1 from pg_roles where rolname = '$PG_USER'")" != 1 ]; then
    pg_admin -c "create role \"$PG_USER\" login password '$PG_PASSWORD' createdb" >/dev/null
    log "postgres: created role $PG_USER (LOGIN CREATEDB, password '$PG_PASSWORD')"
  fi
  if [ "$(pg_admin -c "select 1 from pg_database where datname = '$PG_DATABASE'")" != 1 ]; then
    pg_admin -c "create database \"$PG_DATABASE\" owner \"$PG_USER\"" >/dev/null
    log "postgres: created database $PG_DATABASE (owner $PG_USER)"
  fi

  # TCP password login, as the services do it.
  if ! err="$(pg_login_check)"; then
    if [[ "$err" == *"password authentication failed"* ]]; then
      pg_admin -c "alter role \"$PG_USER\" with login password '$PG_PASSWORD'" >/dev/null
      log "postgres: CHANGED the password of existing role $PG_USER to '$PG_PASSWORD' (login was refused with the expected one)"
      err="$(pg_login_check)" || true
    fi
    if [ -n "$err" ]; then
      log "postgres: TCP login as $PG_USER failed: ${err//$'\n'/ }"
      pg_hba_allow
      err="$(pg_login_check)" || die "postgres: TCP login as $PG_USER still fails after the pg_hba.conf change: $err"
    fi
  fi
  log "postgres: TCP login postgres://$PG_USER@127.0.0.1:$PG_PORT/$PG_DATABASE works"
}

start_kafka() {
  local tansu="$ADSTACK_HOME/tansu/bin/tansu"
  reuse_or_prepare kafka "$KAFKA_PORT" && return 0
  [ -x "$tansu" ] || die "$tansu not found (run scripts/install.sh)"
  launch kafka "$tansu" broker \
    --cluster-id adserve-local \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/
  await kafka "$KAFKA_PORT" 30
  note kafka "127.0.0.1:$KAFKA_PORT" "started (pid $(owned_pid kafka), tansu, in-memory)"
  # The broker starts empty: the aggregators' progress in Redis (how far each
  # partition is applied, realtime::progress_key) describes a log that is
  # gone, and the feature-service would report the real-time tier as stale
  # until the aggregator's first report. Forget it.
  local prefix
  prefix="$(sed -n 's/^key_prefix *= *"\([^"]*\)".*/\1/p' "$ADSTACK_REPO/crates/adserve-features/features.toml")"
  if [ -n "$prefix" ] && command -v redis-cli >/dev/null && port_open "$REDIS_PORT"; then
    redis-cli -p "$REDIS_PORT" DEL "$prefix:aggregates:progress" >/dev/null || true
  fi
}

start_dynamodb() {
  local dir="$ADSTACK_HOME/dynamodb-local"
  reuse_or_prepare dynamodb "$DYNAMODB_PORT" && return 0
  [ -f "$dir/DynamoDBLocal.jar" ] || die "$dir/DynamoDBLocal.jar not found (run scripts/install.sh)"
  command -v java >/dev/null || die "java not found (run scripts/install.sh)"
  local -a jopts
  read -r -a jopts <<<"${DYNAMODB_JAVA_OPTS:--Xmx512m -XX:+UseSerialGC}"
  # DynamoDB Local binds all interfaces; it has no bind-address option.
  (cd "$dir" && launch dynamodb java "${jopts[@]}" "-Djava.library.path=$dir/DynamoDBLocal_lib" \
    -jar DynamoDBLocal.jar -inMemory -sharedDb -port "$DYNAMODB_PORT")
  await dynamodb "$DYNAMODB_PORT" 60
  note dynamodb "127.0.0.1:$DYNAMODB_PORT" "started (pid $(owned_pid dynamodb), in-memory)"
}

start_infra() {
  start_redis
  start_postgres
  start_kafka
  start_dynamodb
}

# --------------------------------------------------------------- services

profile_dir() {
  case "$ADSTACK_PROFILE" in
    debug | dev) printf 'debug\n' ;;
    *) printf '%s\n' "$ADSTACK_PROFILE" ;;
  esac
}

build_services() {
  local -a args=(build)
  local s
  case "$ADSTACK_PROFILE" in
    debug | dev) ;;
    release) args+=(--release) ;;
    *) args+=(--profile "$ADSTACK_PROFILE") ;;
  esac
  for s in "${ADSTACK_SERVICES[@]}"; do args+=(--bin "$s"); done
  args+=(--bin adservectl)
  if [ "${ADSTACK_SKIP_BUILD:-0}" = 1 ]; then
    log "ADSTACK_SKIP_BUILD=1: not building"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found (install Rust, or set ADSTACK_SKIP_BUILD=1 to use existing binaries)"
  log "cargo ${args[*]} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$ADSTACK_REPO" && cargo "${args[@]}") || die "cargo build failed"
}

# ensure_our_build NAME BIN: when NAME's port answers, make sure the process is
# NAME running this checkout's binary BIN. Reusing infrastructure is right;
# reusing a service is right only when it is the same build (a fresh clone must
# not test services built from another checkout). A service of ours built from
# another binary is stopped (start_service then starts BIN); anything else on
# the port is refused with a message.
ensure_our_build() {
  local name="$1" bin="$2" grpc metrics info service pid sha i
  grpc="$(svc_port "$name" grpc)"
  metrics="$(svc_port "$name" metrics)"
  port_open "$grpc" || return 0
  info="$(http_body "$metrics" /buildinfo)" || info=""
  service="$(json_field "$info" service)"
  pid="$(json_field "$info" pid)"
  if [ "$service" != "$name" ] || ! [[ "$pid" =~ ^[0-9]+$ ]]; then
    # A build from before /buildinfo existed, started by this script.
    pid="$(owned_pid "$name")" || pid=""
  fi
  if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
    die "$name: 127.0.0.1:$grpc is held by a process that is not $name (GET 127.0.0.1:$metrics/buildinfo answered ${info:-nothing}); stop it or move $name to other ports (scripts/env.sh)"
  fi
  if same_binary "$pid" "$bin"; then
    return 0
  fi
  if ! [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"$name"* ]]; then
    die "$name (pid $pid, $(json_field "$info" git_sha)) on 127.0.0.1:$grpc is not visible from here (another container or user?); stop it before starting this checkout's build"
  fi
  sha="$(json_field "$info" git_sha)"
  log "$name: pid $pid runs another build (git ${sha:-unknown}, $(readlink "/proc/$pid/exe" 2>/dev/null)); restarting it on $bin"
  kill -TERM "$pid" 2>/dev/null || die "$name: cannot signal pid $pid"
  for ((i = 0; i < 150; i++)); do pid_alive "$pid" || break; sleep 0.1; done
  pid_alive "$pid" && { kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; }
  rm -f "$(pid_file "$name")"
  for ((i = 0; i < 50; i++)); do port_open "$grpc" || return 0; sleep 0.1; done
  die "$name: 127.0.0.1:$grpc is still open after stopping pid $pid"
}

# start_service NAME [VAR=value...]: the common settings plus the given ones.
start_service() {
  local name="$1" bin grpc metrics addr
  shift
  grpc="$(svc_port "$name" grpc)"
  metrics="$(svc_port "$name" metrics)"
  addr="grpc 127.0.0.1:$grpc, metrics :$metrics"
  [ "$name" = adserve-gateway ] && addr="http :$GATEWAY_HTTP_PORT, $addr"
  bin="$CARGO_TARGET_DIR/$(profile_dir)/$name"
  ensure_our_build "$name" "$bin"
  if reuse_or_prepare "$name" "$grpc" "$addr"; then
    return 0
  fi
  [ -x "$bin" ] || die "$name: binary $bin not found (build it: cargo build --bin $name)"
  if port_open "$metrics"; then
    die "$name: metrics port 127.0.0.1:$metrics is already taken by another process"
  fi
  # ADSERVE_* is service configuration only (the services refuse unknown keys);
  # this script's own knobs are ADSTACK_*.
  launch "$name" env \
    "ADSERVE_SERVER__GRPC_ADDR=127.0.0.1:$grpc" \
    "ADSERVE_SERVER__METRICS_ADDR=127.0.0.1:$metrics" \
    "ADSERVE_TELEMETRY__LOG_JSON=true" \
    "ADSERVE_TELEMETRY__LOG_FILTER=${ADSERVE_TELEMETRY__LOG_FILTER:-info,ort=warn}" \
    "$@" "$bin"
  await "$name" "$grpc" 60
  note "$name" "$addr" "started (pid $(owned_pid "$name"))"
}

wait_healthz() { # NAME PORT SECONDS
  local name="$1" port="$2" secs="$3" i code=""
  for ((i = 0; i < secs * 5; i++)); do
    code="$(http_status "$port" /healthz)" || code=""
    [ "$code" = 200 ] && return 0
    sleep 0.2
  done
  owned_pid "$name" >/dev/null && log_tail "$name"
  die "$name: GET http://127.0.0.1:$port/healthz did not return 200 within $secs s (last status: ${code:-no answer})"
}

start_services() {
  local s kafka="127.0.0.1:$KAFKA_PORT" parquet="${ADSTACK_PARQUET_DIR:-$ADSTACK_RUN/parquet}"
  local model="${ADSTACK_MODEL_DIR:-$ADSTACK_REPO/models/ctr-baseline}"
  for s in redis postgres kafka dynamodb; do
    port_open "$(infra_port "$s")" || log "warning: $s (127.0.0.1:$(infra_port "$s")) is not up; run scripts/start.sh infra"
  done
  # Always build (cargo is quick when nothing changed): a running service is
  # reused only when it runs the binary this checkout builds.
  build_services
  for s in "${ADSTACK_SERVICES[@]}"; do
    [ -x "$CARGO_TARGET_DIR/$(profile_dir)/$s" ] || die "$s: binary $CARGO_TARGET_DIR/$(profile_dir)/$s not found after the build"
  done
  [ -d "$model" ] || log "warning: ranker model dir $model does not exist (set ADSTACK_MODEL_DIR)"
  mkdir -p "$parquet"

  start_service adserve-auction
  # The model registry's schema (the rankers follow it but do not migrate it).
  ADSERVE_REGISTRY__POSTGRES__URL="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE" \
    "$CARGO_TARGET_DIR/$(profile_dir)/adservectl" migrate >/dev/null ||
    log "warning: adservectl migrate failed; the ranker serves model.dir until the registry exists"
  start_service adserve-ranker \
    "ADSERVE_MODEL__DIR=$model" \
    "ADSERVE_REGISTRY__ENABLED=${ADSTACK_RANKER_REGISTRY:-true}" \
    "ADSERVE_KAFKA__BROKERS=$kafka" \
    "ADSERVE_REGISTRY__POSTGRES__URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE" \
    "ADSERVE_ONNXRUNTIME_DYLIB=$ORT_DYLIB_PATH"
  # Credentials come from the service's config (dynamodb.access_key_id), not AWS_*.
  # It also runs the streaming aggregates (mode = both): the real-time counters.
  # ADSTACK_FEATURES_MODE=serve turns them off (scripts/bench.sh does).
  start_service adserve-feature-service \
    "ADSERVE_REDIS__URL=redis://127.0.0.1:$REDIS_PORT" \
    "ADSERVE_DYNAMODB__ENDPOINT=http://127.0.0.1:$DYNAMODB_PORT" \
    "ADSERVE_AGGREGATES__KAFKA__BROKERS=$kafka" \
    "ADSERVE_MODE=${ADSTACK_FEATURES_MODE:-both}"
  start_service adserve-label-joiner \
    "ADSERVE_KAFKA__BROKERS=$kafka" \
    "ADSERVE_OUTPUT_DIR=$parquet" \
    "ADSERVE_LABEL_WINDOW=$ADSTACK_LABEL_WINDOW"
  start_service adserve-gateway \
    "ADSERVE_HTTP_ADDR=127.0.0.1:$GATEWAY_HTTP_PORT" \
    "ADSERVE_POSTGRES__URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE" \
    "ADSERVE_KAFKA__BROKERS=$kafka" \
    "ADSERVE_KAFKA__PUBLISH_TIMEOUT=${ADSTACK_PUBLISH_TIMEOUT:-1s}" \
    "ADSERVE_DEADLINES__REQUEST=${ADSTACK_REQUEST_BUDGET:-1500ms}" \
    "ADSERVE_OPENRTB__CLICK_URL=http://127.0.0.1:$GATEWAY_HTTP_PORT/v1/clicks/redirect" \
    "ADSERVE_OPENRTB__BILLING_URL=http://127.0.0.1:$GATEWAY_HTTP_PORT/openrtb2/billing" \
    "ADSERVE_UPSTREAMS__FEATURE_SERVICE=http://127.0.0.1:$FEATURE_SERVICE_GRPC_PORT" \
    "ADSERVE_UPSTREAMS__RANKER=http://127.0.0.1:$RANKER_GRPC_PORT" \
    "ADSERVE_UPSTREAMS__AUCTION=http://127.0.0.1:$AUCTION_GRPC_PORT"
  wait_healthz adserve-gateway "$GATEWAY_HTTP_PORT" 60
  log "adserve-gateway: GET http://127.0.0.1:$GATEWAY_HTTP_PORT/healthz -> 200"
}

case "$what" in
  infra) start_infra ;;
  services) start_services ;;
  all) start_infra; start_services ;;
esac

printf '\n%-24s %-50s %s\n' COMPONENT ADDRESS STATE
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r c a s <<<"$row"
  printf '%-24s %-50s %s\n' "$c" "$a" "$s"
done
printf '\npids: %s  logs: %s\n' "$ADSTACK_PIDS" "$ADSTACK_LOGS"
