-- The consumer's position, written in the same transaction as the effect of the event read
-- there: a restart resumes exactly after the last committed effect, whatever the broker's
-- group coordinator does.
CREATE TABLE consumer_offsets (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    updated_at  TEXT    NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Outbox rows may go to another topic than the saga topic (dead letters go to <topic>.DLT);
-- null means the saga topic. A row the broker refuses for good (too large, say) is marked
-- published with the refusal in `error`, so it cannot block the rows behind it.
ALTER TABLE outbox ADD COLUMN topic TEXT;
ALTER TABLE outbox ADD COLUMN error TEXT;

-- The local record of every message this service parked, also when the dead-letter topic
-- cannot take it.
CREATE TABLE dead_letters (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       BIGINT  NOT NULL,
    message_key    TEXT,
    payload_bytes  BIGINT  NOT NULL,
    payload_sha256 TEXT    NOT NULL,
    parked_at      TEXT    NOT NULL
);
-- (Service migrations use other dates: diesel keys applied migrations by version alone, and
-- the plumbing's and a service's share one table.)
