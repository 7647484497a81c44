-- 0008: agent workflows (issue 12): results flow to dependents, tasks spawn tasks,
-- attempts checkpoint, tasks wait for a named event, workflows cancel as a whole.
--
-- workflow_id is NULL for a task that starts its own workflow (its workflow is its own
-- id): a plain enqueue writes no entry in tasks_workflow, so it costs nothing more.
-- claim_reads tells the claim what to read besides the row, so a task without
-- dependencies, event or checkpoint costs no extra query: 1 its dependencies' results,
-- 2 its event's data, 4 its checkpoint.
ALTER TABLE tasks ADD COLUMN parent_id TEXT;       -- the task whose successful attempt spawned it
ALTER TABLE tasks ADD COLUMN workflow_id TEXT;     -- NULL: its own id
ALTER TABLE tasks ADD COLUMN await_event TEXT;     -- blocked until an event of this name was sent
ALTER TABLE tasks ADD COLUMN run_on_failure INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN claim_reads INTEGER NOT NULL DEFAULT 0;

-- The name a dependency had in the enqueue_many call (its local id), for ctx.inputs.
ALTER TABLE task_deps ADD COLUMN alias TEXT;

CREATE INDEX tasks_workflow ON tasks (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX tasks_awaiting ON tasks (await_event) WHERE await_event IS NOT NULL;

-- The last state an attempt stored with ctx.checkpoint (written by the supervisor, fenced
-- by the attempt); read when a later attempt starts.
CREATE TABLE checkpoints (
    task_id  TEXT PRIMARY KEY REFERENCES tasks(id) ON DELETE CASCADE,
    attempt  INTEGER NOT NULL,
    state    TEXT NOT NULL,             -- JSON
    saved_at REAL NOT NULL
);

-- Events sent with send_event: kept, so one sent before its task exists releases it at
-- once; a name is sent once (a second send changes nothing).
CREATE TABLE events (
    name    TEXT PRIMARY KEY,
    data    TEXT,                       -- JSON, NULL = none
    sent_at REAL NOT NULL
);
