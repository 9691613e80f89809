DROP INDEX orders_settled;
