-- 0007: how many times each task rescheduled itself (the handler raised Retry).
-- A reschedule spends no attempt, so max_attempts never ends a task that raises Retry
-- for ever; the supervisor fails it for good past max_reschedules. A manual retry resets it.
ALTER TABLE tasks ADD COLUMN reschedules INTEGER NOT NULL DEFAULT 0;
