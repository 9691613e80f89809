-- The saga topic's partition an outbox row goes to, stamped when it is written: each instance
-- publishes the rows of the partitions it holds (their leases), in id order. Null: a row for
-- another topic (dead letters), or written before the partition count was known; the holder of
-- the `relay` lease publishes those.
ALTER TABLE outbox ADD COLUMN topic_partition INTEGER;
CREATE INDEX outbox_unpublished_by_partition ON outbox (topic_partition, id)
    WHERE published_at IS NULL;
