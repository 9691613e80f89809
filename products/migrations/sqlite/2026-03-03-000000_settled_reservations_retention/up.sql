-- Retention finds settled reservations by state and last change without a scan.
CREATE INDEX stock_reservations_settled ON stock_reservations (state, updated_at);
-- Units of Delivered reservations since pruned: they stay in the product's `delivered`, so
-- stock + reserved + delivered is still conserved after retention deletes the rows.
ALTER TABLE products ADD COLUMN delivered_archived BIGINT NOT NULL DEFAULT 0;
