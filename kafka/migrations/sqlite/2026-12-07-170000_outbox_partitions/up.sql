-- The saga topic's partition an outbox row goes to, stamped when it is written: each instance
-- publishes the rows of the partitions it holds (their leases), in id order. Null: a row for
-- another topic (dead letters), or written before the partition count was known; the holder of
-- the `relay` lease publishes those. No index of its own: a relay's poll reads the pending rows'
-- index (outbox_unpublished) from past what it published a while ago, where few rows of other
-- partitions lie, and each more index costs every insert and mark.
ALTER TABLE outbox ADD COLUMN topic_partition INTEGER;
