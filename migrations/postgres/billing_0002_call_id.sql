-- The caller's call id of an invocation record (`sfaas.call_id`): the attempts of one call share
-- it, each execution keeping its own usage id.
ALTER TABLE usage_records ADD COLUMN call_id TEXT;
