#!/usr/bin/env bash
# The one test command: `cargo test --workspace` (unit tests of every saga rule, the event
# contract, and the in-process end-to-end tests on rdkafka's MockCluster), then the real-broker
# suite: a fresh tansu broker and fresh databases on free ports, the three service binaries as
# separate processes, every scenario over HTTP; then a short fault-injection run (`chaos`:
# kills, a double kill, a broker kill and restart, a SIGSTOP, a graceful restart, during a
# mixed workload, then every invariant checked); then the browser test: the dashboard in
# headless Chromium (installed with apt-get when missing), driven through chromedriver.
# Ends with one line: `N passed, N failed`.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
check_prerequisites

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

say "1/4 cargo test --workspace"
cargo test --workspace 2>&1 | tee "$log"
cargo_status="${PIPESTATUS[0]}"
read -r unit_passed unit_failed < <(
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
       END { print p + 0, f + 0 }' "$log")
if [[ "$cargo_status" != 0 && "$unit_failed" == 0 ]]; then
  unit_failed=1 # it did not even build
fi

say "2/4 real-broker suite"
ensure_tansu
suite_passed=0
suite_failed=1
if cargo build --bins 2>&1 | tail -n 3; then
  # The suite stops every process it started, also on Ctrl-C.
  target/debug/stack-suite --bin-dir target/debug --tansu "$TANSU" | tee "$log"
  read -r suite_passed suite_failed < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, (NR ? f + 0 : 1) }' "$log")
  grep -qE '^[0-9]+ passed, [0-9]+ failed$' "$log" || suite_failed=$((suite_failed + 1))
fi

say "3/4 short chaos run (seeded; replay a failure with scripts/chaos.sh --seed N)"
chaos_passed=0
chaos_failed=1
if [[ -x target/debug/chaos ]]; then
  target/debug/chaos --bin-dir target/debug --tansu "$TANSU" ${CHAOS_SEED:+--seed "$CHAOS_SEED"} | tee "$log"
  read -r chaos_passed chaos_failed < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, (NR ? f + 0 : 1) }' "$log")
  grep -qE '^[0-9]+ passed, [0-9]+ failed$' "$log" || chaos_failed=$((chaos_failed + 1))
fi

say "4/4 browser test (the dashboard in headless Chromium)"
browser_passed=0
browser_failed=1
# In a subshell: a failed install counts as a failure here instead of ending the run.
if ( ensure_chromium ) && [[ -x target/debug/browser-test ]]; then
  target/debug/browser-test --bin-dir target/debug --tansu "$TANSU" | tee "$log"
  read -r browser_passed browser_failed < <(awk '/^[0-9]+ passed, [0-9]+ failed$/ { p = $1; f = $3 } END { print p + 0, (NR ? f + 0 : 1) }' "$log")
  grep -qE '^[0-9]+ passed, [0-9]+ failed$' "$log" || browser_failed=$((browser_failed + 1))
fi

echo
say "cargo test: $unit_passed passed, $unit_failed failed; real-broker suite: $suite_passed passed, $suite_failed failed; chaos: $chaos_passed passed, $chaos_failed failed; browser: $browser_passed passed, $browser_failed failed"
passed=$((unit_passed + suite_passed + chaos_passed + browser_passed))
failed=$((unit_failed + suite_failed + chaos_failed + browser_failed))
echo "$passed passed, $failed failed"
[[ "$failed" == 0 ]]
