-- stateful-faas core: tenants, tokens, functions and the durable async queue.

CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT PRIMARY KEY NOT NULL,
    plan        TEXT,
    created_ms  INTEGER NOT NULL
);

-- Tokens are stored as SHA-256 hashes; `tenant` is NULL for platform-wide scopes (meter).
CREATE TABLE IF NOT EXISTS tokens (
    hash        TEXT PRIMARY KEY NOT NULL,
    tenant      TEXT REFERENCES tenants(name) ON DELETE CASCADE,
    scope       TEXT NOT NULL CHECK (scope IN ('ingest', 'read', 'meter')),
    created_ms  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS functions (
    tenant      TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    spec        TEXT NOT NULL,           -- FunctionDeployment JSON, as accepted
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- One row per accepted async call, de-duplicated by (tenant, call_id).
-- state: queued -> running -> done | dead; running rows are re-queued at start (at-least-once).
CREATE TABLE IF NOT EXISTS async_calls (
    tenant          TEXT NOT NULL,
    call_id         TEXT NOT NULL,
    function        TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    query           TEXT NOT NULL,
    headers         TEXT NOT NULL,       -- JSON array of [name, value]
    body            BLOB NOT NULL,
    callback_url    TEXT,
    traceparent     TEXT,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    PRIMARY KEY (tenant, call_id)
);

CREATE INDEX IF NOT EXISTS async_calls_due ON async_calls (state, next_attempt_ms);
