-- Usage records as immutable segments: one row holds the records of one tenant's invoice
-- (billed period) that one extraction chunk or one merge wrote, sorted by (start, usage id).
-- `keys` is the sorted 64-bit hashes of their usage ids (the de-duplication index), `data`
-- the records themselves (billing's segment format). The rows of `usage_records` are moved
-- here the first time billing opens the database, and that table is then dropped.
CREATE TABLE IF NOT EXISTS usage_segments (
    id                  BIGSERIAL PRIMARY KEY,              -- never reused: caches key on it
    tenant              TEXT NOT NULL,
    billed_period       TEXT NOT NULL,
    level               BIGINT NOT NULL,     -- merges: 0 written by a chunk, n+1 merged from n
    records             BIGINT NOT NULL,
    first_start_ns      BIGINT NOT NULL,
    last_start_ns       BIGINT NOT NULL,
    first_received_ms   BIGINT NOT NULL,
    last_received_ms    BIGINT NOT NULL,
    keys                BYTEA NOT NULL,
    data                BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_segments_by_invoice ON usage_segments (tenant, billed_period, level);
