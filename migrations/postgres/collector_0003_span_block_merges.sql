-- Merged span blocks: a block that a merge replaced is retired (no reader lists it) and its file
-- removed a grace period later, so that a reader that listed it before the merge still finds it.
ALTER TABLE span_blocks ADD COLUMN retired_ms BIGINT;
CREATE INDEX span_blocks_retired ON span_blocks (retired_ms) WHERE retired_ms IS NOT NULL;
