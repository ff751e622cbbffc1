-- The tokens the core accepts, as it publishes them for collectors and dashboards that cannot
-- read its own database (on other hosts): SHA-256 hashes only, never a token.
CREATE TABLE IF NOT EXISTS published_tokens (
    hash    TEXT PRIMARY KEY,
    tenant  TEXT,              -- NULL for the admin and meter tokens
    scope   TEXT NOT NULL      -- admin | meter | ingest | read
);
