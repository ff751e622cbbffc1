-- Flows and the durable journal of their runs.

CREATE TABLE IF NOT EXISTS flows (
    tenant      TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    definition  TEXT NOT NULL,          -- FlowDefinition JSON
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- One row per run; `definition` is the flow as it was when the run started, so that a run
-- resumed after a restart runs what it started with.
CREATE TABLE IF NOT EXISTS flow_runs (
    tenant              TEXT NOT NULL,
    run_id              TEXT NOT NULL,
    flow                TEXT NOT NULL,
    definition          TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    input               BLOB NOT NULL,
    output              BLOB,
    error               TEXT,
    callback_url        TEXT,
    parent_run          TEXT,
    traceparent         TEXT,
    state_byte_seconds  TEXT,
    created_ms          INTEGER NOT NULL,
    finished_ms         INTEGER,
    PRIMARY KEY (tenant, run_id)
);

CREATE INDEX IF NOT EXISTS flow_runs_by_status ON flow_runs (status);
CREATE INDEX IF NOT EXISTS flow_runs_by_flow ON flow_runs (tenant, flow, created_ms);

-- Node states of a run. `output` keeps small outputs inline (durable); larger ones are only in
-- the state store, at `output_ref` within the run's job.
CREATE TABLE IF NOT EXISTS flow_nodes (
    tenant        TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    node          TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'skipped', 'cancelled')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    output        BLOB,
    output_ref    TEXT,
    output_bytes  INTEGER,
    error         TEXT,
    started_ms    INTEGER,
    finished_ms   INTEGER,
    PRIMARY KEY (tenant, run_id, node)
);
