DROP INDEX voided_orders_by_age;
DROP INDEX deliveries_settled;
