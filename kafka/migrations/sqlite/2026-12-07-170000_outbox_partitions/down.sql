ALTER TABLE outbox DROP COLUMN topic_partition;
