#!/usr/bin/env bash
# Apache Kafka's kafka-topics, as in Kafka's own bin/ (see kafka-run-class.sh).
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/kafka-run-class.sh" org.apache.kafka.tools.TopicCommand "$@"
