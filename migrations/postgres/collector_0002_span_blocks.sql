-- Span blocks: Parquet files of one tenant's spans (collector/src/store/blocks). A block is
-- listed here once its file is durable; the write-ahead log segments it was sealed from are
-- recorded per collector, so that a restart replays exactly the segments not yet in a block.
CREATE TABLE span_blocks (
    id               TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    location         TEXT NOT NULL,       -- path under the blocks folder
    min_start_ns     BIGINT NOT NULL,
    max_start_ns     BIGINT NOT NULL,
    min_received_ms  BIGINT NOT NULL,
    max_received_ms  BIGINT NOT NULL,
    rows             BIGINT NOT NULL,
    bytes            BIGINT NOT NULL,
    services         TEXT NOT NULL,       -- JSON array of the block's service names
    created_ms       BIGINT NOT NULL
);
CREATE INDEX span_blocks_by_tenant ON span_blocks (tenant, max_start_ns);
CREATE INDEX span_blocks_by_arrival ON span_blocks (max_received_ms);
CREATE TABLE span_wal_seals (
    collector        TEXT PRIMARY KEY,
    sealed_through   BIGINT NOT NULL     -- the last segment number whose spans are in blocks
);
