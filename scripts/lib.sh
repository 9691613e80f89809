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

# Dies, naming everything missing at once, unless this machine has what building and running
# the mall needs: cargo; cc (rustc links through it, and the bundled C of librdkafka, SQLite and
# zlib is compiled with it, so it must find the libc headers); a C++ compiler and make
# (rdkafka-sys builds librdkafka with its own ./configure, which insists on a C++ compiler, then
# `make libs`); curl (up.sh polls /health); and Linux's /proc (the pid files). Not needed: cmake,
# pkg-config, python3, perl, system zlib or sqlite (the crates bundle them or do without).
check_prerequisites() {
  local missing=() apt=() sudo="" item cxx=""
  command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust)")
  if ! command -v cc >/dev/null 2>&1; then
    missing+=("cc (a C compiler: rustc links with it; librdkafka is C)"); apt+=(build-essential)
  elif ! cc -E -x c - <<<'#include <stdio.h>' >/dev/null 2>&1; then
    missing+=("the C library headers (cc cannot find stdio.h)"); apt+=(build-essential)
  fi
  for item in ${CXX:+"$CXX"} c++ g++ clang++; do
    command -v "$item" >/dev/null 2>&1 && { cxx="$item"; break; }
  done
  [[ -n "$cxx" ]] || { missing+=("a C++ compiler (c++, g++ or clang++: librdkafka's configure requires one)"); apt+=(build-essential); }
  command -v make >/dev/null 2>&1 || { missing+=("make (builds librdkafka)"); apt+=(build-essential); }
  command -v curl >/dev/null 2>&1 || { missing+=("curl (up.sh polls /health)"); apt+=(curl); }
  [[ -r /proc/self/stat ]] || missing+=("a Linux /proc filesystem (the pid files are checked against it)")
  (( ${#missing[@]} == 0 )) && return 0
  local msg="this machine lacks what the mall needs:" pkgs=""
  for item in "${missing[@]}"; do msg+=$'\n'"  - $item"; done
  if (( ${#apt[@]} )); then
    for item in "${apt[@]}"; do [[ " $pkgs " == *" $item "* ]] || pkgs+=" $item"; done
    (( EUID == 0 )) || sudo="sudo "
    msg+=$'\n'"install them (Debian/Ubuntu): ${sudo}apt-get install$pkgs"
  fi
  command -v cargo >/dev/null 2>&1 || msg+=$'\n'"install Rust with rustup: https://rustup.rs"
  die "$msg"
}

# Pid files (data/<name>.pid) hold "pid starttime": starttime is field 22 of /proc/<pid>/stat
# (clock ticks from boot to the process's start), so the pair names one process even after the
# pid is recycled. A one-field file (just a pid, as older scripts wrote) is only a hint.

# Reads /proc/<pid>/stat into PROC_STATE (field 3: R, S, D, T, Z zombie, X dead, ...) and
# PROC_START (field 22); false when there is no such process. Parsed after the last ')', since
# the command name (field 2) may contain spaces and parentheses.
proc_stat() {
  local line
  local -a f
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || return 1
  { IFS= read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
  read -r -a f <<<"${line##*) }"
  (( ${#f[@]} >= 20 )) || return 1
  PROC_STATE="${f[0]}" PROC_START="${f[19]}"
}

# The program a process runs: /proc/<pid>/exe (without the " (deleted)" it gets when the binary
# is replaced, e.g. by a rebuild), or argv[0] when the link cannot be read (another user's process).
proc_program() {
  local exe argv0=""
  if exe="$(readlink "/proc/$1/exe" 2>/dev/null)" && [[ -n "$exe" ]]; then
    echo "${exe% (deleted)}"
    return 0
  fi
  { IFS= read -r -d '' argv0 <"/proc/$1/cmdline"; } 2>/dev/null || true
  [[ -n "$argv0" ]] && echo "$argv0"
}

# True when the process named by pid file $1 is alive, not a zombie, and is program $2 (an
# absolute path) started when the file says. Sets PIDFILE_PID and PIDFILE_START (the recorded
# starttime, empty in a one-field file) and, when false, PID_STALE: why (empty when there is
# no pid file at all).
pid_alive() {
  local pidfile="$1" program="$2" pid="" start="" running=""
  PIDFILE_PID="" PIDFILE_START="" PID_STALE=""
  [[ -f "$pidfile" ]] || return 1
  { read -r pid start _ <"$pidfile"; } 2>/dev/null || true
  if [[ ! "$pid" =~ ^[1-9][0-9]*$ ]]; then
    PID_STALE="it holds no pid"
    return 1
  fi
  PIDFILE_PID="$pid"
  [[ "$start" =~ ^[0-9]+$ ]] && PIDFILE_START="$start"
  if ! proc_stat "$pid"; then
    PID_STALE="no process $pid"
    return 1
  fi
  case "$PROC_STATE" in
    Z) PID_STALE="pid $pid is a zombie: it exited and its parent has not reaped it"; return 1 ;;
    X) PID_STALE="pid $pid is dead"; return 1 ;;
  esac
  running="$(proc_program "$pid")" || true
  if [[ -n "$PIDFILE_START" && "$PROC_START" != "$PIDFILE_START" ]]; then
    PID_STALE="pid $pid now belongs to another process (${running:-unknown}, started later)"
    return 1
  fi
  if [[ "$running" != "$program" && "$running" != "$(readlink -m "$program")" ]]; then
    PID_STALE="pid $pid now belongs to ${running:-another program}"
    return 1
  fi
}

# Writes pid file $1 for process $2, just started in the background to run program $3: waits
# (at most 5 s) until the forked shell has exec'd the program, so that pid_alive recognises it,
# then records "pid starttime". Records nothing more than the pid when the process is gone.
record_pid() {
  local pidfile="$1" pid="$2" program="$3" running
  for _ in $(seq 1 500); do
    proc_stat "$pid" || break
    [[ "$PROC_STATE" == [ZX] ]] && break
    running="$(proc_program "$pid")" || true
    [[ "$running" == "$program" || "$running" == "$(readlink -m "$program")" ]] && break
    sleep 0.01
  done
  if proc_stat "$pid"; then
    echo "$pid $PROC_START" >"$pidfile"
  else
    echo "$pid" >"$pidfile"
  fi
}

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

# Installs Chromium and its WebDriver (Debian's chromium and chromium-driver) unless both are
# there: the dashboard's browser test drives /usr/bin/chromium through /usr/bin/chromedriver.
ensure_chromium() {
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
  command -v apt-get >/dev/null 2>&1 || die "the browser test needs /usr/bin/chromium and /usr/bin/chromedriver, and this machine has no apt-get to install them; install Chromium and its chromedriver there by hand"
  local sudo=""
  if (( EUID != 0 )); then
    command -v sudo >/dev/null 2>&1 || die "installing chromium and chromium-driver needs root: run as root or install sudo"
    sudo="sudo"
  fi
  local apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get)
  say "installing chromium and chromium-driver for the browser test (once; a few minutes)"
  if ! "${apt[@]}" install -y chromium chromium-driver; then
    say "apt-get install failed; updating the package lists and trying again"
    "${apt[@]}" update && "${apt[@]}" install -y chromium chromium-driver \
      || die "could not install chromium and chromium-driver; see apt-get's output above"
  fi
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] \
    || die "chromium-driver installed, but /usr/bin/chromium or /usr/bin/chromedriver is missing"
}

# Starts tansu on KAFKA_BROKERS with SQLite storage under data/ unless a broker answers there.
ensure_broker() {
  local broker pid started=false pidfile="$DATA/tansu.pid"; broker="$(first_broker)"
  if port_open "$broker"; then
    say "broker answers at $broker; using it"
    return 0
  fi
  case "$broker" in
    127.0.0.1:*|localhost:*) ;;
    *) die "no broker answers at $broker, and one is started only on this machine (127.0.0.1)" ;;
  esac
  if pid_alive "$pidfile" "$TANSU"; then
    say "tansu is running (pid $PIDFILE_PID) but does not answer at $broker yet; waiting"
  else
    [[ -n "$PID_STALE" ]] && say "data/tansu.pid is stale ($PID_STALE); starting tansu"
    ensure_tansu
    mkdir -p "$DATA"
    # tansu resolves a relative sqlite path against its working directory.
    pushd "$DATA" >/dev/null
    nohup "$TANSU" broker \
      --listener-url "tcp://$broker" --advertised-listener-url "tcp://$broker" \
      --storage-engine "sqlite://tansu.db" >>"$DATA/tansu.log" 2>&1 </dev/null &
    pid=$!
    record_pid "$pidfile" "$pid" "$TANSU"
    popd >/dev/null
    started=true
    say "started tansu at $broker, pid $pid (storage data/tansu.db, log data/tansu.log)"
  fi
  for _ in $(seq 1 100); do
    port_open "$broker" && return 0
    pid_alive "$pidfile" "$TANSU" || die "tansu exited; last lines of data/tansu.log:
$(tail -n 15 "$DATA/tansu.log" 2>/dev/null)"
    sleep 0.1
  done
  $started && die "tansu did not answer at $broker within 10 s; see data/tansu.log"
  die "tansu (pid $PIDFILE_PID, data/tansu.pid) runs but does not answer at $broker; is KAFKA_BROKERS what it was started with? scripts/down.sh stops it"
}
