-- Billing (SQLite). Times are ns since the epoch unless named _ms; money and state
-- byte-seconds are exact decimal text (never floats); periods are keys like 2026-11 or 2026-11-26.

-- Extraction reads metered spans by arrival time, from its watermark on.
CREATE INDEX IF NOT EXISTS spans_metered_by_arrival ON spans (received_ms) WHERE metered = 1;

CREATE TABLE IF NOT EXISTS billing_settings (
    key    TEXT PRIMARY KEY,     -- rate_card (canonical JSON), watermark_ms
    value  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS tenant_plans (
    tenant             TEXT NOT NULL,
    effective_from_ns  BIGINT NOT NULL,
    plan               TEXT NOT NULL,
    PRIMARY KEY (tenant, effective_from_ns)
);

-- One row per billable item: an invocation (usage_id = faas.invocation_id) or a state interval
-- (usage_id = state/...). Inserted once, never updated.
CREATE TABLE IF NOT EXISTS usage_records (
    tenant              TEXT NOT NULL,
    usage_id            TEXT NOT NULL,
    kind                TEXT NOT NULL,       -- invocation | state
    function            TEXT NOT NULL,       -- '' for state
    flow_run            TEXT,                -- the flow run (invocations of flow nodes, job state)
    trace_id            TEXT NOT NULL,
    span_id             TEXT NOT NULL,
    start_ns            BIGINT NOT NULL,
    end_ns              BIGINT NOT NULL,
    cpu_ms              BIGINT NOT NULL,
    wall_ms             BIGINT NOT NULL,
    memory_peak_bytes   BIGINT NOT NULL,
    bytes_in            BIGINT NOT NULL,
    bytes_out           BIGINT NOT NULL,
    status_code         BIGINT NOT NULL,
    state_byte_seconds  TEXT NOT NULL,
    period              TEXT NOT NULL,       -- the period the usage happened in
    billed_period       TEXT NOT NULL,       -- the invoice it is billed on (later when late)
    plan                TEXT NOT NULL,       -- the tenant's plan at start_ns
    received_ms         BIGINT NOT NULL,
    PRIMARY KEY (tenant, usage_id)
) WITHOUT ROWID;  -- one B-tree: inserts and the per-tenant walks follow the key

-- Running sums of usage_records, maintained incrementally.
CREATE TABLE IF NOT EXISTS usage_totals (
    tenant              TEXT NOT NULL,
    billed_period       TEXT NOT NULL,
    period              TEXT NOT NULL,
    plan                TEXT NOT NULL,
    function            TEXT NOT NULL,
    records             BIGINT NOT NULL,
    invocations         BIGINT NOT NULL,
    errors              BIGINT NOT NULL,
    cpu_ms              BIGINT NOT NULL,
    wall_ms             BIGINT NOT NULL,
    bytes_out           BIGINT NOT NULL,
    state_byte_seconds  TEXT NOT NULL,
    PRIMARY KEY (tenant, billed_period, period, plan, function)
);

CREATE TABLE IF NOT EXISTS invoices (
    tenant        TEXT NOT NULL,
    period        TEXT NOT NULL,
    status        TEXT NOT NULL,             -- draft | final
    currency      TEXT NOT NULL,
    total         TEXT NOT NULL,
    document      TEXT NOT NULL,             -- the invoice as JSON, byte for byte what the API serves
    updated_ms    BIGINT NOT NULL,
    PRIMARY KEY (tenant, period)
);
