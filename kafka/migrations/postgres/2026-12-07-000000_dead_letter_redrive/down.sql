ALTER TABLE outbox DROP COLUMN headers;
DROP INDEX dead_letters_by_status;
ALTER TABLE dead_letters DROP COLUMN resolution;
ALTER TABLE dead_letters DROP COLUMN status;
ALTER TABLE dead_letters DROP COLUMN order_id;
ALTER TABLE dead_letters DROP COLUMN event_id;
ALTER TABLE dead_letters DROP COLUMN event_type;
ALTER TABLE dead_letters DROP COLUMN payload;
