-- 0011: another name for a task. A task given its own id by its caller (a spawn, or an
-- enqueue_many entry) whose dedupe key was held by an unfinished task is not stored: it is
-- that task, and the id its caller already holds (a handler may have returned it, or named
-- it in depends_on) names it here. Gone with the task.
CREATE TABLE task_aliases (
    alias   TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX task_aliases_task ON task_aliases (task_id);
