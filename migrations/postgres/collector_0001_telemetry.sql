-- The collector's telemetry store (PostgreSQL). Ids are lowercase hex; times are ns since the epoch;
-- attributes, events, links, resources and scopes are JSON text.

CREATE TABLE IF NOT EXISTS spans (
    tenant          TEXT NOT NULL,
    trace_id        TEXT NOT NULL,
    span_id         TEXT NOT NULL,
    parent_span_id  TEXT,
    name            TEXT NOT NULL,
    kind            BIGINT NOT NULL,
    start_ns        BIGINT NOT NULL,
    end_ns          BIGINT NOT NULL,
    status_code     BIGINT NOT NULL,
    status_message  TEXT NOT NULL,
    service_name    TEXT NOT NULL,
    attributes      TEXT NOT NULL,
    events          TEXT NOT NULL,
    links           TEXT NOT NULL,
    resource        TEXT NOT NULL,
    scope           TEXT NOT NULL,
    metered         BIGINT NOT NULL,    -- 1: sent with a meter token (billable)
    received_ms     BIGINT NOT NULL,
    PRIMARY KEY (tenant, trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_by_time ON spans (tenant, start_ns);
CREATE INDEX IF NOT EXISTS spans_by_service ON spans (tenant, service_name, start_ns);

CREATE TABLE IF NOT EXISTS metric_samples (
    tenant       TEXT NOT NULL,
    metric       TEXT NOT NULL,
    labels       TEXT NOT NULL,          -- canonical JSON object, keys sorted
    kind         TEXT NOT NULL,          -- gauge | counter | histogram | summary
    ts_ns        BIGINT NOT NULL,
    value        DOUBLE PRECISION,       -- gauge/counter value; histogram/summary: the sum; NULL = NaN
    histogram    TEXT,                   -- {"count","sum","buckets":[[le, cumulative count], ...]}
    metered      BIGINT NOT NULL,
    received_ms  BIGINT NOT NULL,
    PRIMARY KEY (tenant, metric, labels, ts_ns)
);
CREATE INDEX IF NOT EXISTS samples_by_time ON metric_samples (tenant, metric, ts_ns);

CREATE TABLE IF NOT EXISTS logs (
    tenant           TEXT NOT NULL,
    record_hash      TEXT NOT NULL,      -- SHA-256 of the record: the same record is stored once
    ts_ns            BIGINT NOT NULL,
    severity_number  BIGINT NOT NULL,
    severity_text    TEXT NOT NULL,
    body             TEXT NOT NULL,
    attributes       TEXT NOT NULL,
    resource         TEXT NOT NULL,
    trace_id         TEXT,
    span_id          TEXT,
    metered          BIGINT NOT NULL,
    received_ms      BIGINT NOT NULL,
    PRIMARY KEY (tenant, record_hash)
);
CREATE INDEX IF NOT EXISTS logs_by_time ON logs (tenant, ts_ns);
