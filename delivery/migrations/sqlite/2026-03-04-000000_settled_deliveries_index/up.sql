-- Retention finds finished deliveries and old voided orders by age without a scan.
CREATE INDEX deliveries_settled ON deliveries (delivery_state, updated_at);
CREATE INDEX voided_orders_by_age ON voided_orders (voided_at);
