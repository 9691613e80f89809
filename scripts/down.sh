#!/usr/bin/env bash
# Stops what scripts/up.sh started, by pid: SIGTERM (graceful: finish the event in hand,
# commit, flush), then SIGKILL after 15 s. --wipe also deletes data/ (databases, broker
# storage, logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

wipe=false
case "${1:-}" in
  --wipe) wipe=true ;;
  "") ;;
  *) die "usage: scripts/down.sh [--wipe]" ;;
esac

stop() {
  local name="$1" pidfile="$DATA/$1.pid"
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  local pid; pid="$(cat "$pidfile")"
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  say "$name did not stop within 15 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# Services first, so they can flush to the broker before it goes.
for svc in "${SERVICES[@]}"; do stop "$svc"; done
stop tansu

if $wipe; then
  say "removing data/"
  rm -rf "$DATA"
fi
