# Shared by the scripts in this folder: paths, settings, the broker (Apache Kafka by default,
# tansu with BROKER=tansu), PostgreSQL.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/data"
TOOLS="$ROOT/.tools"
TANSU="$TOOLS/bin/tansu"
TANSU_VERSION="0.6.0"
# Apache Kafka: its jars from Maven Central (scripts/kafka/pom.xml) in .tools/kafka-<version>/.
KAFKA_VERSION="4.1.1"
KAFKA_HOME="$TOOLS/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
# The broker the scripts start and the suites run on: kafka (Apache Kafka) or tansu.
BROKER="${BROKER:-kafka}"
case "$BROKER" in
  kafka|tansu) ;;
  *) printf '\033[31merror:\033[0m BROKER=%s: kafka (Apache Kafka, the default) or tansu\n' "$BROKER" >&2; exit 1 ;;
esac

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
  # librdkafka is built with OpenSSL (SASL/SCRAM and TLS to the broker), found by pkg-config.
  if ! command -v pkg-config >/dev/null 2>&1; then
    missing+=("pkg-config (finds OpenSSL for librdkafka)"); apt+=(pkg-config)
  elif ! pkg-config --exists openssl 2>/dev/null; then
    missing+=("OpenSSL's headers (librdkafka's SASL/SCRAM and TLS)"); apt+=(libssl-dev)
  fi
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

# Installs Debian packages with apt-get (through sudo when not root), updating the package lists
# and trying again when the first attempt fails. $1 says what needs them, for the messages.
apt_install() {
  local need="$1" sudo=""
  shift
  command -v apt-get >/dev/null 2>&1 \
    || die "$need, and this machine has no apt-get to install $*; install them by hand"
  if (( EUID != 0 )); then
    command -v sudo >/dev/null 2>&1 || die "installing $* needs root: run as root or install sudo"
    sudo="sudo"
  fi
  local apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get)
  if ! "${apt[@]}" install -y "$@"; then
    say "apt-get install failed; updating the package lists and trying again"
    "${apt[@]}" update && "${apt[@]}" install -y "$@" \
      || die "could not install $*; see apt-get's output above"
  fi
}

# Installs Chromium and its WebDriver (Debian's chromium and chromium-driver) unless both are
# there: the dashboard's browser test drives /usr/bin/chromium through /usr/bin/chromedriver.
ensure_chromium() {
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
  say "installing chromium and chromium-driver for the browser test (once; a few minutes)"
  apt_install "the browser test needs /usr/bin/chromium and /usr/bin/chromedriver" \
    chromium chromium-driver
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] \
    || die "chromium-driver installed, but /usr/bin/chromium or /usr/bin/chromedriver is missing"
}

# The java to run Kafka with ($JAVA_HOME/bin/java, else the one on PATH), resolved to its real
# path (what /proc/<pid>/exe shows, so pid files recognise the broker); dies when there is
# none, or it is older than 17 (Kafka 4 needs 17), saying how to proceed.
kafka_java() {
  local java major
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    java="$JAVA_HOME/bin/java"
  else
    java="$(command -v java 2>/dev/null)" \
      || die "Apache Kafka needs Java 17 or newer and there is no java: apt-get install openjdk-17-jre-headless (or set JAVA_HOME), or run on the tansu broker without Java: BROKER=tansu $0"
  fi
  major="$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
  [[ "$major" =~ ^[0-9]+$ ]] && (( major >= 17 )) \
    || die "Apache Kafka $KAFKA_VERSION needs Java 17 or newer; $java is ${major:-of unknown version}: install openjdk-17-jre-headless (or set JAVA_HOME), or run on tansu: BROKER=tansu $0"
  readlink -f "$java"
}

# Fetches Apache Kafka's jars from Maven Central into .tools/kafka-<version>/libs unless they
# are there (Maven, once; about a minute).
ensure_kafka() {
  [[ -f "$KAFKA_HOME/.complete" ]] && return 0
  kafka_java >/dev/null
  command -v mvn >/dev/null 2>&1 \
    || die "Maven fetches Apache Kafka's jars from Maven Central and there is no mvn: apt-get install maven, or run on tansu: BROKER=tansu $0"
  say "fetching Apache Kafka $KAFKA_VERSION from Maven Central into .tools/kafka-$KAFKA_VERSION (once)"
  rm -rf "$KAFKA_HOME"
  mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS" \
    || die "Maven could not fetch Apache Kafka $KAFKA_VERSION (see its output above)"
  [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" && -f "$KAFKA_LIBS/kafka-tools-$KAFKA_VERSION.jar" ]] \
    || die "Maven ran, but .tools/kafka-$KAFKA_VERSION/libs lacks Kafka's jars"
  touch "$KAFKA_HOME/.complete"
}

# The broker option of the suites (stack-suite, chaos, browser-test, saga-bench): the jars of
# Apache Kafka or tansu's binary, installed first if need be.
broker_args() {
  if [[ "$BROKER" == tansu ]]; then
    ensure_tansu >&2
    echo "--tansu $TANSU"
  else
    ensure_kafka >&2
    echo "--kafka $KAFKA_LIBS"
  fi
}

# True when a metadata request to KAFKA_BROKERS answers with a registered broker within $1
# seconds (default 2): an open port is not a broker that is ready. Needs target/release/mall-topic.
broker_ready() {
  "$ROOT/target/release/mall-topic" ready --timeout "${1:-2}" >/dev/null 2>&1
}

# True when data/kafka.pid names a running broker of ours: its pid runs java with our
# configuration file.
kafka_alive() {
  local java
  java="$(kafka_java)"
  pid_alive "$DATA/kafka.pid" "$java" || return 1
  tr '\0' ' ' <"/proc/$PIDFILE_PID/cmdline" 2>/dev/null | grep -qF "$DATA/kafka/server.properties" \
    || { PID_STALE="pid $PIDFILE_PID runs java, but not our broker"; return 1; }
}

# Starts a single-node Apache Kafka (broker and controller in one JVM, KRaft) on KAFKA_BROKERS
# (127.0.0.1:9092; its controller on the next port), data in data/kafka/data, log
# data/kafka.log; formats the storage on first start.
start_kafka() {
  local broker="$1" port controller pid java cluster
  port="${broker##*:}"
  controller=$((port + 1))
  ensure_kafka
  java="$(kafka_java)"
  mkdir -p "$DATA/kafka/data"
  port_open "127.0.0.1:$controller" && die "port $controller (the Kafka controller's, KAFKA_BROKERS' port + 1) is taken by another process"
  cat >"$DATA/kafka/server.properties" <<EOT
# written by scripts/lib.sh's start_kafka at each start: a single node, broker and controller
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA/kafka/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
unclean.leader.election.enable=false
num.network.threads=2
num.io.threads=2
background.threads=2
log.cleaner.threads=1
EOT
  local jvm=(${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dmall.log="$DATA/kafka.log"
    -Dlog4j2.configurationFile="$ROOT/scripts/kafka/broker-log4j2.properties" -cp "$KAFKA_LIBS/*")
  if [[ ! -f "$DATA/kafka/data/meta.properties" ]]; then
    cluster="$("$java" "${jvm[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null)" \
      || die "Kafka's StorageTool could not make a cluster id"
    "$java" "${jvm[@]}" kafka.tools.StorageTool format --ignore-formatted -t "$cluster" \
      -c "$DATA/kafka/server.properties" >>"$DATA/kafka.log" 2>&1 \
      || die "formatting Kafka's storage in data/kafka/data failed; see data/kafka.log"
    say "formatted Kafka's storage in data/kafka/data (cluster id $cluster)"
  fi
  nohup "$java" "${jvm[@]}" kafka.Kafka "$DATA/kafka/server.properties" \
    >>"$DATA/kafka.log" 2>&1 </dev/null &
  pid=$!
  record_pid "$DATA/kafka.pid" "$pid" "$java"
  say "started Apache Kafka $KAFKA_VERSION at $broker, pid $pid (data data/kafka/data, log data/kafka.log)"
}

# Starts tansu on KAFKA_BROKERS with SQLite storage in data/tansu.db.
start_tansu() {
  local broker="$1" pid
  ensure_tansu
  mkdir -p "$DATA"
  # tansu resolves a relative sqlite path against its working directory.
  pushd "$DATA" >/dev/null
  nohup "$TANSU" broker \
    --listener-url "tcp://$broker" --advertised-listener-url "tcp://$broker" \
    --storage-engine "sqlite://tansu.db" >>"$DATA/tansu.log" 2>&1 </dev/null &
  pid=$!
  record_pid "$DATA/tansu.pid" "$pid" "$TANSU"
  popd >/dev/null
  say "started tansu at $broker, pid $pid (storage data/tansu.db, log data/tansu.log)"
}

# Makes sure a broker answers at KAFKA_BROKERS: one that answers a metadata request is used
# (whatever it is; nothing is installed); otherwise BROKER (kafka or tansu) is started here on
# 127.0.0.1 unless ours already runs, and waited for (90 s at most: a cold JVM on two busy
# cores). Needs target/release/mall-topic. Sets BROKER_LINE: what runs, for the banner.
ensure_broker() {
  local broker started=false alive=false i
  broker="$(first_broker)"
  if [[ "$BROKER" == kafka ]]; then
    BROKER_LINE="Apache Kafka $KAFKA_VERSION, data data/kafka/data, log data/kafka.log"
  else
    BROKER_LINE="tansu $TANSU_VERSION, storage data/tansu.db, log data/tansu.log"
  fi
  if broker_ready 3; then
    # In a subshell: kafka_alive dies without Java, and a broker of someone else needs none.
    ( kafka_alive ) >/dev/null 2>&1 || pid_alive "$DATA/tansu.pid" "$TANSU" \
      || BROKER_LINE="a broker not started by these scripts"
    say "a broker answers at $broker; using it"
    return 0
  fi
  case "$broker" in
    127.0.0.1:*|localhost:*) ;;
    *) die "no broker answers at $broker, and one is started only on this machine (127.0.0.1)" ;;
  esac
  if [[ "$BROKER" == kafka ]]; then kafka_alive && alive=true; else pid_alive "$DATA/tansu.pid" "$TANSU" && alive=true; fi
  if $alive; then
    say "$BROKER is running (pid $PIDFILE_PID) but does not answer at $broker yet; waiting"
  else
    [[ -n "$PID_STALE" ]] && say "data/$BROKER.pid is stale ($PID_STALE); starting $BROKER"
    port_open "$broker" && die "port ${broker##*:} is taken by a process that does not answer as a Kafka broker; free it or set KAFKA_BROKERS"
    if [[ "$BROKER" == kafka ]]; then start_kafka "$broker"; else start_tansu "$broker"; fi
    started=true
  fi
  for i in $(seq 1 90); do
    broker_ready 1 && return 0
    if [[ "$BROKER" == kafka ]]; then
      kafka_alive || die "Kafka exited; last lines of data/kafka.log:
$(tail -n 15 "$DATA/kafka.log" 2>/dev/null)"
    else
      pid_alive "$DATA/tansu.pid" "$TANSU" || die "tansu exited; last lines of data/tansu.log:
$(tail -n 15 "$DATA/tansu.log" 2>/dev/null)"
    fi
  done
  $started && die "$BROKER did not answer at $broker within 90 s; see data/$BROKER.log"
  die "$BROKER (pid $PIDFILE_PID, data/$BROKER.pid) runs but does not answer at $broker; is KAFKA_BROKERS what it was started with? scripts/down.sh stops it"
}

# --- PostgreSQL: scripts/up.sh --instances N and scripts/test.sh ------------------------------
# With POSTGRES_URL set (an existing server's maintenance database, e.g.
# postgres://me:pw@db:5432/postgres) the scripts use that server and start none; otherwise they
# run their own, as the `postgres` OS user when root (initdb refuses to run as root).

# The directory of the server programs (initdb, pg_ctl, postgres, pg_isready, psql): where pg_ctl
# on PATH really lives, else Debian's /usr/lib/postgresql/<newest version>/bin. Sets PG_BIN;
# false when there is none.
find_pg_bin() {
  local dir found
  local -a candidates=()
  if found="$(command -v pg_ctl 2>/dev/null)" && [[ -n "$found" ]]; then
    candidates+=("$(dirname "$(readlink -f "$found")")")
  fi
  mapfile -t -O "${#candidates[@]}" candidates < <(
    printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5rn)
  for dir in "${candidates[@]}"; do
    if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" && -x "$dir/postgres" && -x "$dir/pg_isready" \
      && -x "$dir/psql" ]]; then
      PG_BIN="$dir"
      return 0
    fi
  done
  PG_BIN=""
  return 1
}

# Sets PSQL to a psql that runs: the server's own, else the one on PATH; false when none does.
find_psql() {
  PSQL=""
  if find_pg_bin; then
    PSQL="$PG_BIN/psql"
  else
    PSQL="$(command -v psql 2>/dev/null)" || true
  fi
  [[ -n "$PSQL" ]] && "$PSQL" --version >/dev/null 2>&1
}

# Makes sure PostgreSQL can be used. With POSTGRES_URL only psql is needed (to create the
# databases); otherwise the server programs: Debian's postgresql package is installed with
# apt-get when initdb or pg_ctl is missing (Debian's postinst may also create and start its own
# cluster "main" on 5432; the scripts do not use it). Sets PSQL, and PG_BIN without POSTGRES_URL.
ensure_postgres() {
  if [[ -n "${POSTGRES_URL:-}" ]]; then
    find_psql && return 0
    say "installing postgresql-client (psql, to create the databases on POSTGRES_URL's server)"
    apt_install "psql is needed to create databases on POSTGRES_URL's server" postgresql-client
    find_psql || die "postgresql-client installed, but psql does not run"
    return 0
  fi
  if ! find_pg_bin; then
    say "installing PostgreSQL (Debian's postgresql: initdb, pg_ctl, psql; once, about a minute)"
    apt_install "PostgreSQL's server programs (initdb, pg_ctl) are missing" postgresql
    find_pg_bin || die "postgresql installed, but no directory holds initdb, pg_ctl, postgres, pg_isready and psql (looked beside pg_ctl on PATH and in /usr/lib/postgresql/*/bin)"
    say "PostgreSQL's programs are in $PG_BIN"
  fi
  PSQL="$PG_BIN/psql"
  if (( EUID == 0 )); then
    id -u postgres >/dev/null 2>&1 \
      || die "as root, the PostgreSQL server has to run as another user, and there is no 'postgres' user: create one (useradd --system --home-dir /var/lib/postgresql postgres) or run as a normal user"
    command -v runuser >/dev/null 2>&1 || die "as root, runuser (util-linux) is needed to run the PostgreSQL server as the postgres user"
  fi
}

# Runs a server command as the owner of the data directory: the postgres user when root, else
# this user. From /, so that the command does not stumble on a working directory it cannot read.
pg_as_owner() {
  if (( EUID == 0 )); then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && "$@")
  fi
}

# True when a PostgreSQL server runs on data directory $1: the pid on the first line of its
# postmaster.pid is alive (not a zombie), runs a postgres program and works in that directory
# (the postmaster changes into its data directory), so a stale file whose pid was recycled does
# not count. Sets PG_PID and PG_RUNNING_PORT (the file's fourth line).
pg_running() {
  local dir="$1" pid="" port="" cwd program
  PG_PID="" PG_RUNNING_PORT=""
  [[ -f "$dir/postmaster.pid" ]] || return 1
  { read -r pid && read -r _ && read -r _ && read -r port; } <"$dir/postmaster.pid" 2>/dev/null || true
  proc_stat "$pid" || return 1
  [[ "$PROC_STATE" == [ZX] ]] && return 1
  program="$(proc_program "$pid")" || true
  [[ "${program##*/}" == postgres || "${program##*/}" == postmaster ]] || return 1
  cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null)" || return 1
  [[ "$cwd" == "$(readlink -f "$dir")" ]] || return 1
  PG_PID="$pid" PG_RUNNING_PORT="$port"
}

# True when postgres processes work in data directory $1 (as its postmaster and every backend
# do); sets PG_LEFTOVERS to their pids.
pg_leftovers() {
  local dir proc pid program
  dir="$(readlink -f "$1")"
  PG_LEFTOVERS=""
  for proc in /proc/[1-9]*; do
    pid="${proc#/proc/}"
    [[ "$(readlink "$proc/cwd" 2>/dev/null)" == "$dir" ]] || continue
    proc_stat "$pid" || continue
    [[ "$PROC_STATE" == [ZX] ]] && continue
    program="$(proc_program "$pid")" || true
    [[ "${program##*/}" == postgres || "${program##*/}" == postmaster ]] || continue
    PG_LEFTOVERS+="${PG_LEFTOVERS:+ }$pid"
  done
  [[ -n "$PG_LEFTOVERS" ]]
}

# Starts a PostgreSQL server on data directory $1 (created and initialised on first use:
# scram-sha-256 for local and 127.0.0.1 connections only, superuser `postgres` with a generated
# password in $1.password, mode 0600), listening on 127.0.0.1:$2 only with its unix socket in $1
# and its log in $1/server.log, and waits until it accepts connections. A server already running
# on $1 is reused; a postmaster.pid left by a crash is removed first; a directory left with
# trust by older scripts gets a password. Its maintenance database, password included:
# `pg_local_url $1 $2`.
start_postgres() {
  local dir="$1" port="$2" out socket_dir pid pw_file initdb_pw initdb_status
  if [[ ! "$port" =~ ^[1-9][0-9]*$ ]] || (( port > 65535 )); then
    die "start_postgres: '$port' is not a port"
  fi
  find_pg_bin || die "no PostgreSQL server programs (initdb, pg_ctl); ensure_postgres installs them"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd -P)"
  if pg_running "$dir"; then
    [[ "$PG_RUNNING_PORT" == "$port" ]] \
      || die "PostgreSQL already runs on $dir (pid $PG_PID) but on port $PG_RUNNING_PORT, not $port; stop it (scripts/down.sh) or use POSTGRES_PORT=$PG_RUNNING_PORT"
    say "PostgreSQL already running on 127.0.0.1:$port (pid $PG_PID, data $dir)"
  else
    if (( EUID == 0 )); then
      chown postgres: "$dir"
      chmod 700 "$dir"
      runuser -u postgres -- test -w "$dir" -a -x "$dir" \
        || die "the postgres user, which runs the server when root runs the scripts, cannot reach $dir (a directory above it, e.g. /root, is closed to it): put the checkout where it can, run as a normal user, or set POSTGRES_URL to a server of your own"
    fi
    if [[ ! -f "$dir/PG_VERSION" ]]; then
      [[ -z "$(ls -A "$dir")" ]] || die "$dir is neither empty nor a PostgreSQL data directory; move it away"
      pw_file="$(pg_password_file "$dir")"
      say "initialising a PostgreSQL data directory in $dir (scram-sha-256, the password in $pw_file)"
      [[ -s "$pw_file" ]] || new_pg_password "$pw_file"
      # initdb reads the password from a file the server's owner can read, removed at once.
      initdb_pw="$(mktemp)"
      cat "$pw_file" >"$initdb_pw"
      (( EUID == 0 )) && chown postgres: "$initdb_pw"
      out="$(pg_as_owner "$PG_BIN/initdb" -D "$dir" -U postgres -A scram-sha-256 --pwfile="$initdb_pw" -E UTF8 --locale=C 2>&1)"
      initdb_status=$?
      rm -f "$initdb_pw"
      (( initdb_status == 0 )) || die "initdb failed:
$out"
      pg_hba_scram "$dir"
      printf '\n%s\n' "include_if_exists = 'mall.conf'   # written by scripts/lib.sh at each start" \
        >>"$dir/postgresql.conf"
    fi
    # The socket path has to fit in 107 bytes; a deeper directory gets TCP only.
    socket_dir="$dir"
    (( ${#dir} + 20 > 107 )) && socket_dir=""
    printf '%s\n' "# written by scripts/lib.sh's start_postgres at each start" \
      "port = $port" "listen_addresses = '127.0.0.1'" \
      "unix_socket_directories = '${socket_dir//\'/\'\'}'" \
      "max_connections = 500   # 11 connections per service instance (7 reads, 3 writers, the relay)" \
      "shared_preload_libraries = 'pg_stat_statements'   # statements per saga (saga-bench)" \
      >"$dir/mall.conf"
    (( EUID == 0 )) && chown postgres: "$dir/mall.conf" "$dir/pg_hba.conf"
    if [[ -f "$dir/postmaster.pid" ]]; then
      # The server checks this file itself, but cannot tell a recycled pid of another user
      # from its own. Its backends outliving a killed postmaster would still use the data
      # directory: they exit by themselves within moments; wait for that before removing it.
      read -r pid _ <"$dir/postmaster.pid" 2>/dev/null || true
      for _ in $(seq 1 100); do
        pg_leftovers "$dir" || break
        sleep 0.1
      done
      pg_leftovers "$dir" && die "PostgreSQL processes still work in $dir (pids $PG_LEFTOVERS) although its postmaster is gone; stop them first"
      say "$dir/postmaster.pid is stale (left by a crash: pid ${pid:-?} is gone or is not its server); removing it"
      rm -f "$dir/postmaster.pid" "$dir"/.s.PGSQL.*.lock
    fi
    port_open "127.0.0.1:$port" && die "port $port (for PostgreSQL) is taken by another process; free it or set POSTGRES_PORT"
    pg_as_owner "$PG_BIN/pg_ctl" start -D "$dir" -l "$dir/server.log" -w -t 60 -s >/dev/null 2>&1 \
      || die "PostgreSQL did not start on 127.0.0.1:$port; last lines of $dir/server.log:
$(tail -n 15 "$dir/server.log" 2>/dev/null)"
    pg_running "$dir" || true
    say "started PostgreSQL on 127.0.0.1:$port, pid ${PG_PID:-?} (data $dir, log $dir/server.log)"
  fi
  for _ in $(seq 1 300); do
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
      pg_leave_trust "$dir" "$port"
      return 0
    fi
    sleep 0.1
  done
  die "PostgreSQL on 127.0.0.1:$port does not accept connections within 30 s; see $dir/server.log"
}

# The password file of the server whose data directory is $1: beside it (data/postgres →
# data/postgres.password), mode 0600, readable by the user who runs the scripts.
pg_password_file() {
  echo "${1%/}.password"
}

# Writes a new random password into file $1, mode 0600.
new_pg_password() {
  ( umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$1" ) || die "cannot write $1"
}

# pg_hba.conf of data directory $1: password (SCRAM) for every connection, local ones only.
pg_hba_scram() {
  printf '%s\n' '# scripts/lib.sh: scram-sha-256 for every connection (the server listens on 127.0.0.1)' \
    'local all all scram-sha-256' 'host all all 127.0.0.1/32 scram-sha-256' >"$1/pg_hba.conf"
  (( EUID == 0 )) && chown postgres: "$1/pg_hba.conf"
  return 0
}

# A data directory $1 initialised by older scripts with trust authentication, its server up on
# port $2: gets a generated password and scram-sha-256, and the server reloads.
pg_leave_trust() {
  local dir="$1" port="$2" pw_file out
  grep -qE '^(local|host).*[[:space:]]trust$' "$dir/pg_hba.conf" 2>/dev/null || return 0
  pw_file="$(pg_password_file "$dir")"
  say "PostgreSQL in $dir used trust authentication: setting a generated password ($pw_file) and scram-sha-256"
  [[ -s "$pw_file" ]] || new_pg_password "$pw_file"
  [[ -n "${PSQL:-}" ]] || find_psql || die "psql is needed to set the password; ensure_postgres installs it"
  out="$("$PSQL" "postgres://postgres@127.0.0.1:$port/postgres" -Xq \
    -c "ALTER ROLE postgres PASSWORD '$(cat "$pw_file")'" 2>&1)" || die "cannot set the password: $out"
  pg_hba_scram "$dir"
  pg_as_owner "$PG_BIN/pg_ctl" reload -D "$dir" -s >/dev/null 2>&1 || die "cannot reload PostgreSQL in $dir"
}

# The URL of the maintenance database of the server start_postgres runs with data directory
# $1 on port $2, with its password.
pg_local_url() {
  local dir pw
  dir="$(cd "$1" && pwd -P)" || die "no PostgreSQL data directory $1"
  pw="$(cat "$(pg_password_file "$dir")" 2>/dev/null)" || die "no password file for the PostgreSQL server in $dir"
  echo "postgres://postgres:$pw@127.0.0.1:$2/postgres"
}

# Stops the PostgreSQL server of data directory $1 if one runs there (fast shutdown: SIGINT,
# then immediate, SIGQUIT, after 30 s); removes a stale postmaster.pid. Needs no server programs.
stop_postgres() {
  local dir="$1" pid
  [[ -f "$dir/postmaster.pid" ]] || return 0
  if ! pg_running "$dir"; then
    say "$dir/postmaster.pid is stale (no server runs there); removing it"
    rm -f "$dir/postmaster.pid"
    return 0
  fi
  pid="$PG_PID"
  say "stopping PostgreSQL (pid $pid, data $dir)"
  kill -INT "$pid" 2>/dev/null || true
  pg_gone_within "$dir" 300 && return 0
  say "PostgreSQL did not stop within 30 s; shutting it down immediately"
  kill -QUIT "$pid" 2>/dev/null || true
  pg_gone_within "$dir" 100 && return 0
  say "PostgreSQL (pid $pid) has still not exited"
  return 1
}

# True once no server runs on data directory $1, checked every 0.1 s, at most $2 times.
pg_gone_within() {
  local dir="$1" tries="$2"
  for _ in $(seq 1 "$tries"); do
    pg_running "$dir" || return 0
    sleep 0.1
  done
  return 1
}

# URL $1 (postgres://user:pw@host:port/db?options) with its database replaced by $2.
pg_url_with_db() {
  local url="$1" name="$2" base query="" rest
  base="${url%%\?*}"
  [[ "$base" == "$url" ]] || query="?${url#*\?}"
  rest="${base#*://}"
  [[ "$rest" == */* ]] && base="${base%"/${rest#*/}"}"
  echo "$base/$name$query"
}

# Creates the databases named $2... on the server whose maintenance database URL is $1 (e.g.
# postgres://postgres@127.0.0.1:5433/postgres), each unless it exists. Their URLs: pg_url_with_db.
create_databases() {
  local url="$1" name out
  shift
  [[ -n "${PSQL:-}" ]] || find_psql || die "psql is needed to create databases; ensure_postgres installs it"
  for name in "$@"; do
    [[ "$name" =~ ^[a-z_][a-z0-9_]*$ ]] || die "create_databases: '$name' is not a plain database name"
    out="$("$PSQL" "$url" -XAtq -c "SELECT 1 FROM pg_database WHERE datname = '$name'" 2>&1)" \
      || die "cannot reach PostgreSQL at $(pg_redact "$url"): $out"
    [[ "$out" == 1 ]] && continue
    if out="$("$PSQL" "$url" -Xq -c "CREATE DATABASE \"$name\"" 2>&1)"; then
      say "created database $name"
    elif [[ "$out" != *"already exists"* ]]; then
      die "cannot create database $name on $(pg_redact "$url"): $out"
    fi
  done
}

# URL $1 with any password replaced by ***, for messages.
pg_redact() {
  local url="$1"
  if [[ "$url" =~ ^([a-z]+://[^:/@]+):[^@/]*@(.*)$ ]]; then
    echo "${BASH_REMATCH[1]}:***@${BASH_REMATCH[2]}"
  else
    echo "$url"
  fi
}
