-- A tenant's calls by state: the async quotas count the calls waiting or running without
-- walking every call the tenant ever made (finished rows stay, for de-duplication).
CREATE INDEX IF NOT EXISTS async_calls_by_tenant ON async_calls (tenant, state);
