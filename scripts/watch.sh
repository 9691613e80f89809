#!/usr/bin/env bash
# Follows the saga topic from the beginning, one JSON line per event, like
# `kafka-console-consumer --from-beginning`. Options: --order ID, --dlt, --from-now.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
bin="target/release/mall-topic"
[[ -x "$bin" ]] || cargo build --release --bin mall-topic
exec "$bin" watch "$@"
