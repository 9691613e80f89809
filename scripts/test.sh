#!/usr/bin/env bash
# The one test command: `cargo test --workspace` (unit tests of every saga rule, the event
# contract, the model check's quick bounds, and the in-process end-to-end tests on rdkafka's
# MockCluster), then the model check's deeper bound, then the real-broker
# suite: a fresh Apache Kafka (BROKER=tansu: tansu) and fresh databases on free ports, the three
# service binaries as separate processes, every scenario over HTTP, Kafka's console tools
# against the running mall; then a short fault-injection run (`chaos`: kills, a double kill, a
# broker kill and restart, a SIGSTOP, a graceful restart, during a mixed workload, then every
# invariant checked); then the browser test: the dashboard in headless Chromium (installed with
# apt-get when missing), driven through chromedriver; then the security suite (foreign origins and
# hosts, a page elsewhere in Chromium, Idempotency-Key retries); then a chaos run on a three-node Kafka
# cluster whose partition leader is SIGKILLed under load, three times.
# Then on PostgreSQL (installed with apt-get when missing): a throwaway server in a temporary
# directory on a free port (stopped and removed at exit, also on failure; with POSTGRES_URL set,
# that server instead), and on it the in-process tests, the real-broker suite with two instances
# of each service, a chaos run with three instances of each service sharing six partitions, and
# one that pauses an orders and a products instance for 30 s together, twice, under load.
# Every suite creates fresh databases of its own on the server.
# A suite that exits non-zero counts as failed even if its last line said otherwise.
# Ends with one line: `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
check_prerequisites

log="$(mktemp)"
pg_dir="" # the throwaway PostgreSQL server's data directory
# Stops and removes the throwaway PostgreSQL server, if any.
remove_postgres() {
  if [[ -n "$pg_dir" ]]; then
    stop_postgres "$pg_dir"
    rm -rf "$pg_dir" "$(pg_password_file "$pg_dir")"
    pg_dir=""
  fi
}
trap 'rm -f "$log"; remove_postgres >/dev/null' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# cargo_counts LOG: "passed failed" summed over the `test result:` lines of cargo test's output.
cargo_counts() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
       END { print p + 0, f + 0 }' "$1"
}

# suite_counts LOG STATUS: "passed failed" from the last `N passed, N failed` line of a suite's
# output; one more failure when there is no such line (it did not finish), or when the program
# exited with a non-zero STATUS although it reported no failure.
suite_counts() {
  local p f
  read -r p f < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, (NR ? f + 0 : 1) }' "$1")
  if ! grep -qE '^[0-9]+ passed, [0-9]+ failed$' "$1"; then
    f=$((f + 1))
  elif [[ "${2:-0}" != 0 && "$f" == 0 ]]; then
    echo "the suite reported no failure but exited with status $2: counted as one" >&2
    f=1
  fi
  echo "$p $f"
}

say "1/8 cargo test --workspace"
timeout 2400 cargo test --workspace 2>&1 | tee "$log" # bounded, as below
cargo_status="${PIPESTATUS[0]}"
read -r unit_passed unit_failed < <(cargo_counts "$log")
if [[ "$cargo_status" != 0 && "$unit_failed" == 0 ]]; then
  unit_failed=1 # it did not even build
fi

say "1b/8 model check of the saga rules, the deeper bound (modelcheck/; cargo test runs the quick one)"
cargo test -p modelcheck --test saga_model -- --ignored --nocapture 2>&1 | tee "$log"
cargo_status="${PIPESTATUS[0]}"
read -r model_passed model_failed < <(cargo_counts "$log")
if [[ "$cargo_status" != 0 && "$model_failed" == 0 ]]; then
  model_failed=1
fi

say "2/8 real-broker suite on $BROKER"
broker=()
# In a subshell, like ensure_chromium: a failed install fails the broker's steps, not the run.
if broker_line="$( broker_args )"; then read -r -a broker <<<"$broker_line"; fi
suite_passed=0
suite_failed=1
if cargo build --bins 2>&1 | tail -n 3; then
  # The suite stops every process it started, also on Ctrl-C.
  target/debug/stack-suite --bin-dir target/debug "${broker[@]}" | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r suite_passed suite_failed < <(suite_counts "$log" "$status")
fi

say "3/8 short chaos run (seeded; replay a failure with scripts/chaos.sh --seed N)"
chaos_passed=0
chaos_failed=1
if [[ -x target/debug/chaos ]]; then
  target/debug/chaos --bin-dir target/debug "${broker[@]}" ${CHAOS_SEED:+--seed "$CHAOS_SEED"} | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r chaos_passed chaos_failed < <(suite_counts "$log" "$status")
fi

say "4/8 browser test (the dashboard in headless Chromium)"
browser_passed=0
browser_failed=1
# In a subshell: a failed install counts as a failure here instead of ending the run.
if ( ensure_chromium ) && [[ -x target/debug/browser-test ]]; then
  target/debug/browser-test --bin-dir target/debug "${broker[@]}" | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r browser_passed browser_failed < <(suite_counts "$log" "$status")
fi

say "4a/8 security suite: foreign origins and hosts refused (also a page elsewhere in headless Chromium), Idempotency-Key retries"
security_passed=0
security_failed=1
if ( ensure_chromium ) && [[ -x target/debug/security-suite ]]; then
  target/debug/security-suite --bin-dir target/debug "${broker[@]}" | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r security_passed security_failed < <(suite_counts "$log" "$status")
fi

say "4b/8 chaos on a three-node Kafka cluster: the leader of the busy partition SIGKILLed under load, three times"
cluster_passed=0
cluster_failed=1
if [[ "$BROKER" != kafka ]]; then
  say "BROKER=$BROKER: the cluster run needs Apache Kafka; not run"
  cluster_failed=0
elif [[ -x target/debug/chaos ]]; then
  target/debug/chaos --bin-dir target/debug "${broker[@]}" --brokers 3 --orders 300 --kills 1 \
    --stops 0 --terms 0 ${CHAOS_SEED:+--seed "$CHAOS_SEED"} | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r cluster_passed cluster_failed < <(suite_counts "$log" "$status")
fi

# PostgreSQL: POSTGRES_URL's server, or a throwaway one. In subshells, like ensure_chromium: a
# failed install or start counts as a failure of each PostgreSQL step instead of ending the run.
pg_url=""
if [[ -n "${POSTGRES_URL:-}" ]]; then
  say "PostgreSQL: the server of POSTGRES_URL, $(pg_redact "$POSTGRES_URL")"
  pg_url="$POSTGRES_URL"
elif ( ensure_postgres ); then
  pg_dir="$(mktemp -d)"
  # A port below Linux's ephemeral range (32768+), so no outgoing connection holds it; a port
  # that looks free can still be taken before the server binds it, so a failed start is retried
  # on another one.
  for attempt in 1 2 3 4 5; do
    pg_port=""
    for _ in $(seq 1 50); do
      candidate=$((20000 + RANDOM % 12000))
      port_open "127.0.0.1:$candidate" || { pg_port="$candidate"; break; }
    done
    [[ -n "$pg_port" ]] || break
    say "PostgreSQL: a throwaway server on 127.0.0.1:$pg_port (data $pg_dir, removed at exit; attempt $attempt)"
    if ( start_postgres "$pg_dir" "$pg_port" ); then
      pg_url="$(pg_local_url "$pg_dir" "$pg_port")"
      break
    fi
  done
fi
[[ -n "$pg_url" ]] || say "no PostgreSQL server: its three steps count as failed"

say "4c/8 the scripts' PostgreSQL refuses a connection without its password"
pg_auth_passed=0
pg_auth_failed=1
if [[ -n "$pg_dir" && -n "$pg_url" ]] && ( find_psql ) ; then
  find_psql
  if refused="$(PGPASSWORD= PGPASSFILE=/nonexistent "$PSQL" "postgres://postgres@127.0.0.1:$pg_port/postgres" -XAtq -w -c 'SELECT 1' 2>&1)"; then
    say "FAIL: connected without a password"
  elif [[ "$refused" == *"password"* ]] && "$PSQL" "$pg_url" -XAtq -c 'SELECT 1' >/dev/null 2>&1 \
      && [[ "$(stat -c %a "$(pg_password_file "$pg_dir")")" == 600 ]]; then
    say "ok: refused without the password ($refused); accepted with it; the password file is mode 0600"
    pg_auth_passed=1
    pg_auth_failed=0
  else
    say "FAIL: refused for another reason, or the password does not work: $refused"
  fi
elif [[ -n "${POSTGRES_URL:-}" ]]; then
  say "POSTGRES_URL's server: not the scripts' own; not checked"
  pg_auth_failed=0
fi

say "5/8 plumbing and in-process tests on PostgreSQL (kafka/tests/postgres.rs, e2e/tests/in_process.rs)"
pg_unit_passed=0
pg_unit_failed=1
if [[ -n "$pg_url" ]]; then
  # Bounded: a hung test fails this step instead of the whole run's time.
  TEST_POSTGRES_URL="$pg_url" REQUIRE_POSTGRES=1 timeout 1200 cargo test --workspace --test postgres --test in_process 2>&1 | tee "$log"
  cargo_status="${PIPESTATUS[0]}"
  read -r pg_unit_passed pg_unit_failed < <(cargo_counts "$log")
  if [[ "$cargo_status" != 0 && "$pg_unit_failed" == 0 ]]; then
    pg_unit_failed=1
  fi
fi

say "6/8 real-broker suite on PostgreSQL: two instances of each service (the conflicting cancel on two instances runs)"
pg_suite_passed=0
pg_suite_failed=1
if [[ -n "$pg_url" && -x target/debug/stack-suite ]]; then
  target/debug/stack-suite --bin-dir target/debug "${broker[@]}" --postgres "$pg_url" \
    --instances 2 --partitions 4 | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r pg_suite_passed pg_suite_failed < <(suite_counts "$log" "$status")
fi

say "7/8 chaos run on PostgreSQL: three instances of each service, six partitions"
pg_chaos_passed=0
pg_chaos_failed=1
if [[ -n "$pg_url" && -x target/debug/chaos ]]; then
  target/debug/chaos --bin-dir target/debug "${broker[@]}" --postgres "$pg_url" \
    --instances 3 --partitions 6 ${CHAOS_SEED:+--seed "$CHAOS_SEED"} | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r pg_chaos_passed pg_chaos_failed < <(suite_counts "$log" "$status")
fi

say "7b/8 on PostgreSQL: an orders and a products instance paused 30 s together, twice, under load (the live instances keep answering, nothing lost or doubled)"
pg_pause_passed=0
pg_pause_failed=1
if [[ -n "$pg_url" && -x target/debug/chaos ]]; then
  target/debug/chaos --bin-dir target/debug "${broker[@]}" --postgres "$pg_url" \
    --instances 3 --partitions 6 --kills 0 --broker-restarts 0 --stops 0 --terms 0 \
    --long-pauses 2 --orders 4000 --rate 50 ${CHAOS_SEED:+--seed "$CHAOS_SEED"} | tee "$log"
  status="${PIPESTATUS[0]}"
  read -r pg_pause_passed pg_pause_failed < <(suite_counts "$log" "$status")
fi

remove_postgres

echo
say "on $BROKER: cargo test: $unit_passed passed, $unit_failed failed; model check (deeper): $model_passed passed, $model_failed failed; real-broker suite: $suite_passed passed, $suite_failed failed; chaos: $chaos_passed passed, $chaos_failed failed; browser: $browser_passed passed, $browser_failed failed; security: $security_passed passed, $security_failed failed; chaos on three brokers: $cluster_passed passed, $cluster_failed failed"
say "on PostgreSQL: without its password: $pg_auth_passed passed, $pg_auth_failed failed; in-process: $pg_unit_passed passed, $pg_unit_failed failed; real-broker suite: $pg_suite_passed passed, $pg_suite_failed failed; chaos (3 instances): $pg_chaos_passed passed, $pg_chaos_failed failed; two instances paused: $pg_pause_passed passed, $pg_pause_failed failed"
passed=$((unit_passed + model_passed + suite_passed + chaos_passed + browser_passed + security_passed + cluster_passed + pg_auth_passed + pg_unit_passed + pg_suite_passed + pg_chaos_passed + pg_pause_passed))
failed=$((unit_failed + model_failed + suite_failed + chaos_failed + browser_failed + security_failed + cluster_failed + pg_auth_failed + pg_unit_failed + pg_suite_failed + pg_chaos_failed + pg_pause_failed))
echo "$passed passed, $failed failed"
[[ "$failed" == 0 ]]
