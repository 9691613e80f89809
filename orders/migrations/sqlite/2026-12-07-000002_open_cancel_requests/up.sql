-- The saga timeout closes cancel requests delivery left unanswered: it scans the open ones
-- by age.
CREATE INDEX orders_cancel_requested ON orders (updated_at) WHERE cancel_requested;
