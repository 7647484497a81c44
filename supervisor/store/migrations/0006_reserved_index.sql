-- 0006: the memory reserved by running tasks is summed from a partial index of the rows
-- that reserve any, so admission costs nothing per claim when no task declares memory
-- (it used to read every running row: 8% of the supervisor's time at 1,000 in flight).
CREATE INDEX tasks_reserved ON tasks (reserved_mb) WHERE status = 'running' AND reserved_mb > 0;
