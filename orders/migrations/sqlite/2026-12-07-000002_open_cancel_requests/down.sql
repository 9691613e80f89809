DROP INDEX orders_cancel_requested;
