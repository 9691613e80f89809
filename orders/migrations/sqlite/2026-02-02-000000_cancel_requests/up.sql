-- A customer cancel of a confirmed order is a request that delivery answers.
ALTER TABLE orders ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT 0;
