#!/usr/bin/env bash
# Runs a class of Apache Kafka's with its jars (fetched into .tools/ from Maven Central on
# first use), as Kafka's own bin/kafka-run-class.sh does. Put scripts/kafka/bin on PATH for
# the seed lab's commands:  export PATH="$PWD/scripts/kafka/bin:$PATH"
#   kafka-run-class.sh <main class> [arguments...]
# KAFKA_OPTS adds JVM options; KAFKA_HEAP_OPTS replaces the heap settings.
set -euo pipefail
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
source "$here/../../lib.sh"
(( $# )) || die "usage: kafka-run-class.sh <main class> [arguments...]"
ensure_kafka >&2 # Kafka's clients take the seed's http://localhost:9092 as it is
main="$1"
shift
# shellcheck disable=SC2086
exec "$(kafka_java)" ${KAFKA_HEAP_OPTS:--Xmx256m} -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
  -Dlog4j2.configurationFile="$ROOT/scripts/kafka/tools-log4j2.properties" ${KAFKA_OPTS:-} \
  -cp "$KAFKA_LIBS/*" "$main" "$@"
