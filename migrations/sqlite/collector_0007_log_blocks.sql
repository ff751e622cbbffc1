-- Log blocks: Parquet files of one tenant's log records (collector/src/store/blocks/logs.rs).
-- Records are written to `logs` and moved into a block by one transaction that lists the block
-- here and deletes them from `logs`.
CREATE TABLE log_blocks (
    id               TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    location         TEXT NOT NULL,       -- path under the blocks folder
    min_ts_ns        INTEGER NOT NULL,
    max_ts_ns        INTEGER NOT NULL,
    min_received_ms  INTEGER NOT NULL,
    max_received_ms  INTEGER NOT NULL,
    rows             INTEGER NOT NULL,
    bytes            INTEGER NOT NULL,
    created_ms       INTEGER NOT NULL
);
CREATE INDEX log_blocks_by_tenant ON log_blocks (tenant, max_ts_ns);
-- A tenant's records by arrival: sealing takes the oldest, a follower reads past its cursor.
CREATE INDEX IF NOT EXISTS logs_by_arrival ON logs (tenant, received_ms, record_hash);
-- The table holds a tenant's newest records only (sealed by the 65 536 or the ten minutes):
-- reading them by function needs no index of its own, which cost every write a third more.
DROP INDEX IF EXISTS logs_by_function;
