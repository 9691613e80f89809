-- Retention finds settled orders by (state, delivery state) and last change without a scan;
-- their history goes with them through order_events_by_order.
CREATE INDEX orders_settled ON orders (state, delivery_state, updated_at);
