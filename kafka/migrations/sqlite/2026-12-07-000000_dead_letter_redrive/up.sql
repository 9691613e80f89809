-- What a redrive needs and what became of each parked message: the parked event itself (only
-- a decoded event, which is small, is kept; an undecodable message can only be discarded), its
-- identity and order, and its status: parked, then redriven or discarded (the resolution
-- says what, when and why).
ALTER TABLE dead_letters ADD COLUMN payload TEXT;
ALTER TABLE dead_letters ADD COLUMN event_type TEXT;
ALTER TABLE dead_letters ADD COLUMN event_id TEXT;
ALTER TABLE dead_letters ADD COLUMN order_id BIGINT;
ALTER TABLE dead_letters ADD COLUMN status TEXT NOT NULL DEFAULT 'parked';
ALTER TABLE dead_letters ADD COLUMN resolution TEXT;
CREATE INDEX dead_letters_by_status ON dead_letters (status, id);

-- Kafka headers of an outbox row, as a JSON object of strings (a redriven event names its
-- original); null for none.
ALTER TABLE outbox ADD COLUMN headers TEXT;
