-- Who does what among the instances sharing this database: the outbox relay ('relay') and
-- each partition of the saga topic ('eventTopic/3') are held by one live instance at a time.
-- A lease not renewed by `expires_at` (milliseconds since the epoch) may be taken over.
CREATE TABLE leases (
    name       TEXT   PRIMARY KEY NOT NULL,
    holder     TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
-- Instances alive, so each can take its fair share of the partitions.
CREATE TABLE members (
    member     TEXT   PRIMARY KEY NOT NULL,
    expires_at BIGINT NOT NULL
);
