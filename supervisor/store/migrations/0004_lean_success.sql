-- 0004: completing a task no longer writes the tasks_finished index.
-- Every succeeded task has a succeeded attempt row ending at its completed_at, so prune
-- finds old succeeded tasks through attempts_ended; the index on completed_at keeps only
-- the failed and cancelled tasks (which may have no attempt at all). One b-tree page
-- fewer written per completion.
DROP INDEX tasks_finished;
CREATE INDEX tasks_finished ON tasks (completed_at) WHERE status IN ('failed','cancelled');
