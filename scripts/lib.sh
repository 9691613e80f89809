# Shared by the scripts in this folder: paths, settings, the broker.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/data"
TOOLS="$ROOT/.tools"
TANSU="$TOOLS/bin/tansu"
TANSU_VERSION="0.6.0"

export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export KAFKA_TOPIC="${KAFKA_TOPIC:-eventTopic}"

SERVICES=(orders products delivery)
declare -A DEFAULT_PORT=([orders]=8081 [products]=8085 [delivery]=8082)

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections at host:port.
port_open() {
  local host="${1%:*}" port="${1##*:}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# The first broker of KAFKA_BROKERS.
first_broker() { echo "${KAFKA_BROKERS%%,*}"; }

# True when the pid in a pid file is alive.
pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Installs tansu into .tools/ unless it is there already (a 6-10 minute build, once).
ensure_tansu() {
  if [[ -x "$TANSU" ]] && "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return 0
  fi
  command -v cargo >/dev/null || die "cargo is needed to install the tansu broker"
  say "installing the tansu $TANSU_VERSION broker into .tools/ (once; 6-10 minutes on 2 cores)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore \
    --root "$TOOLS" 2>&1 | while IFS= read -r line; do
      case "$line" in
        *Compiling*|*Installing*|*Installed*|*error*|*warning:\ be*) printf '   %s\n' "$line" ;;
      esac
    done
  [[ -x "$TANSU" ]] || die "tansu did not install; see the cargo output above"
}

# Starts tansu on KAFKA_BROKERS with SQLite storage under data/ unless a broker answers there.
ensure_broker() {
  local broker; broker="$(first_broker)"
  if port_open "$broker"; then
    say "broker answers at $broker; using it"
    return 0
  fi
  case "$broker" in
    127.0.0.1:*|localhost:*) ;;
    *) die "no broker answers at $broker, and one is started only on this machine (127.0.0.1)" ;;
  esac
  ensure_tansu
  mkdir -p "$DATA"
  say "starting tansu at $broker (storage data/tansu.db, log data/tansu.log)"
  # tansu resolves a relative sqlite path against its working directory.
  pushd "$DATA" >/dev/null
  nohup "$TANSU" broker \
    --listener-url "tcp://$broker" --advertised-listener-url "tcp://$broker" \
    --storage-engine "sqlite://tansu.db" >>"$DATA/tansu.log" 2>&1 </dev/null &
  echo $! >"$DATA/tansu.pid"
  popd >/dev/null
  for _ in $(seq 1 100); do
    port_open "$broker" && return 0
    sleep 0.1
  done
  die "tansu did not start; see data/tansu.log"
}
