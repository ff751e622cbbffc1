-- Bytes of the log lines the platform exported for an invocation (`sfaas.log_bytes`), summed
-- per totals row; rows from before it count none.
ALTER TABLE usage_totals ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0;
