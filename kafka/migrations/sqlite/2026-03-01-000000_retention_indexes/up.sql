-- The retention task deletes by age: published outbox rows by published_at (pending rows are
-- null there and never match) and processed event ids by processed_at. Without these indexes
-- every pruning round would scan both tables.
CREATE INDEX outbox_by_published_at ON outbox (published_at);
CREATE INDEX processed_events_by_processed_at ON processed_events (processed_at);
