-- A tenant's function log lines by function and time: the gateway's `/system/logs`, `sfaas logs`
-- and LogQL's `function` matcher read one function's lines without walking the tenant's others.
-- The expression is the one the readers write, so that PostgreSQL uses the index.
CREATE INDEX IF NOT EXISTS logs_by_function ON logs (tenant, (attributes::jsonb ->> 'faas.name'), ts_ns)
    WHERE metered = 1;
