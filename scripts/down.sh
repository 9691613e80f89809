#!/usr/bin/env bash
# Stops what scripts/up.sh started, by pid: every service (the single instances, data/<svc>.pid,
# and every instance of `up.sh --instances N`, data/<svc>-<k>.pid, whatever N was), SIGTERM
# (graceful: finish the event in hand, commit, flush), then SIGKILL after STOP_TIMEOUT_S seconds
# (default 15); then the broker (Apache Kafka: a controlled shutdown; or tansu), and the PostgreSQL server of data/postgres (fast shutdown; a
# server given by POSTGRES_URL is not ours and is left alone). --wipe also deletes data/
# (databases, broker storage, logs).
#
# Only a process that is verifiably ours is signalled: the pid in data/<name>.pid must be alive
# (a zombie counts as exited), run this checkout's binary (target/release/<name>, or
# .tools/bin/tansu, or java running data/kafka/server.properties) and have started when the
# pid file says. A stale pid file (no such process,
# a zombie, a pid that now belongs to another program) is reported and removed.
#
#   STOP_TIMEOUT_S=30 scripts/down.sh     # give each process 30 s to stop gracefully
set -euo pipefail
source "$(dirname "$0")/lib.sh"

wipe=false
case "${1:-}" in
  --wipe) wipe=true ;;
  "") ;;
  *) die "usage: scripts/down.sh [--wipe]" ;;
esac

STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-15}"
[[ "$STOP_TIMEOUT_S" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT_S must be a whole number of seconds, not '$STOP_TIMEOUT_S'"
[[ -r /proc/self/stat ]] || die "scripts/down.sh needs Linux's /proc to recognise its processes"

# ours PIDFILE PROGRAM [ARG]: pid_alive, and the command line holds ARG when given (the
# broker's JVM is recognised by its configuration file, not only by being java).
ours() {
  pid_alive "$1" "$2" || return 1
  [[ -z "${3:-}" ]] && return 0
  tr '\0' ' ' <"/proc/$PIDFILE_PID/cmdline" 2>/dev/null | grep -qF -- "$3" && return 0
  PID_STALE="pid $PIDFILE_PID runs $2 but not with $3"
  return 1
}

# stop NAME PROGRAM [ARG]: stops the process of data/NAME.pid if it runs PROGRAM (with ARG).
stop() {
  local name="$1" program="$2" arg="${3:-}" pidfile="$DATA/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  if ! ours "$pidfile" "$program" "$arg"; then
    say "data/$name.pid is stale ($PID_STALE); removing it"
    rm -f "$pidfile"
    return 0
  fi
  pid="$PIDFILE_PID"
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  kill -CONT "$pid" 2>/dev/null || true # a stopped (Ctrl-Z) process acts on SIGTERM only once continued
  for _ in $(seq 1 $((STOP_TIMEOUT_S * 10))); do
    ours "$pidfile" "$program" "$arg" || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  if ours "$pidfile" "$program" "$arg"; then
    say "$name did not stop within $STOP_TIMEOUT_S s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      ours "$pidfile" "$program" "$arg" || break
      sleep 0.1
    done
    ours "$pidfile" "$program" "$arg" && say "$name (pid $pid) has still not exited after SIGKILL"
  fi
  rm -f "$pidfile"
}

# Services first, so they can flush to the broker and commit to their database before those
# go. Every instance gets SIGTERM at once (stop_all), so they do not wait for each other.
# stop_all NAME PROGRAM...: stops each data/NAME.pid that runs its PROGRAM, together.
stop_all() {
  local -a pids=()
  while (( $# )); do
    stop "$1" "$2" &
    pids+=("$!")
    shift 2
  done
  (( ${#pids[@]} == 0 )) || wait "${pids[@]}"
}
services=()
shopt -s nullglob
for svc in "${SERVICES[@]}"; do
  [[ -f "$DATA/$svc.pid" ]] && services+=("$svc" "$ROOT/target/release/$svc")
  for pidfile in "$DATA/$svc"-*.pid; do
    name="$(basename "$pidfile" .pid)"
    [[ "${name#"$svc"-}" =~ ^[0-9]+$ ]] && services+=("$name" "$ROOT/target/release/$svc")
  done
done
shopt -u nullglob
stop_all "${services[@]}"
stop tansu "$TANSU"
if [[ -f "$DATA/kafka.pid" ]]; then
  java="$(kafka_java 2>/dev/null)" || java="java (none installed)"
  stop kafka "$java" "$DATA/kafka/server.properties"
fi
stop_postgres "$DATA/postgres"

if $wipe; then
  say "removing data/"
  rm -rf "$DATA"
fi
