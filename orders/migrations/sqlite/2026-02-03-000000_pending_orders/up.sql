-- The saga timeout scans pending orders by age.
CREATE INDEX orders_pending ON orders (created_at) WHERE state = 'OrderPlaced';
