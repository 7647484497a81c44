-- 0012: how many started attempts of a task a model-call relay took down with it (it died
-- or was killed while hosting them). Such an attempt is given back without being spent;
-- past a few (supervisor.children.ISOLATE_AFTER) the task's attempts run in a task
-- process of their own, where a crash spends the attempt. Kept on the row, so the count
-- holds across supervisor restarts and across the supervisors sharing the file.
ALTER TABLE tasks ADD COLUMN relay_losses INTEGER NOT NULL DEFAULT 0;
