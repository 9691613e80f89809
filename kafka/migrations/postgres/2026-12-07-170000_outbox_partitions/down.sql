DROP INDEX outbox_unpublished_by_partition;
ALTER TABLE outbox DROP COLUMN topic_partition;
