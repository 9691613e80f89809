DROP INDEX orders_pending;
