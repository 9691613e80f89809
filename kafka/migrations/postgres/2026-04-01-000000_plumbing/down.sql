DROP TABLE members;
DROP TABLE leases;
DROP TABLE dead_letters;
DROP TABLE consumer_offsets;
DROP TABLE processed_events;
DROP TABLE outbox;
