-- The Kafka cluster the stored consumer positions (consumer_offsets) belong to, per topic:
-- positions are offsets in one cluster's topic, meaningless (events skipped or replayed)
-- against another's.
CREATE TABLE broker_identity (
    topic       TEXT PRIMARY KEY NOT NULL,
    cluster_id  TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
