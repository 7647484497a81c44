-- 0010: the event log, streamed output and task logs (issue 14).
--
-- task_events: one row per task change (kind 'task') or output chunk (kind 'output'), with
-- increasing ids that SSE clients send back as Last-Event-ID. Written by triggers, in
-- the transaction of the change, so every process sharing the file is covered (a
-- client's enqueue or cancel, every supervisor). The triggers write only while
-- task_events_state.enabled is set: a supervisor serving /api/events sets it when a client
-- subscribes and clears it once nobody subscribed for events_retention, so a file
-- nobody watches pays no page per write (one enqueue wrote 3 pages; a 4th was ~25%).
-- Rows are pruned after events_retention; the newest row is always kept, so ids
-- never restart. A task's workflow is its workflow_id, else its own id (0008).
CREATE TABLE task_events (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,              -- 'task' | 'output'
    task_id  TEXT NOT NULL,
    type     TEXT NOT NULL,
    workflow TEXT,
    data     TEXT NOT NULL               -- JSON object sent as the SSE data line
);

CREATE TABLE task_events_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    enabled       INTEGER NOT NULL DEFAULT 0,
    subscribed_at REAL,                  -- last time a supervisor had a subscriber
    since_id      INTEGER NOT NULL DEFAULT 0  -- events after this id are complete
);
INSERT INTO task_events_state (id, enabled, subscribed_at, since_id) VALUES (1, 0, NULL, 0);

CREATE TRIGGER task_events_task_insert AFTER INSERT ON tasks
WHEN (SELECT enabled FROM task_events_state WHERE id = 1) BEGIN
    INSERT INTO task_events (kind, task_id, type, workflow, data) VALUES ('task', new.id, new.type, coalesce(new.workflow_id, new.id),
        json_object('id', new.id, 'type', new.type, 'status', new.status, 'outcome', new.outcome,
                    'progress', new.progress, 'message', new.progress_message,
                    'attempt', new.attempts, 'error', new.error));
END;

CREATE TRIGGER task_events_task_update AFTER UPDATE OF status, progress, progress_message, attempts ON tasks
WHEN (SELECT enabled FROM task_events_state WHERE id = 1)
 AND (old.status IS NOT new.status OR old.progress IS NOT new.progress
      OR old.progress_message IS NOT new.progress_message OR old.attempts IS NOT new.attempts) BEGIN
    INSERT INTO task_events (kind, task_id, type, workflow, data) VALUES ('task', new.id, new.type, coalesce(new.workflow_id, new.id),
        json_object('id', new.id, 'type', new.type, 'status', new.status, 'outcome', new.outcome,
                    'progress', new.progress, 'message', new.progress_message,
                    'attempt', new.attempts, 'error', new.error));
END;

-- Streamed output (ctx.stream): chunks of the latest attempt that streamed, at most
-- max_output_bytes a task (the supervisor cuts there and sets `truncated`).
CREATE TABLE task_output (
    task_id   TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    attempt   INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    pos       INTEGER NOT NULL,          -- characters of this attempt's output before it
    text      TEXT NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt, seq)
) WITHOUT ROWID;

CREATE TRIGGER task_events_output_insert AFTER INSERT ON task_output
WHEN (SELECT enabled FROM task_events_state WHERE id = 1) BEGIN
    INSERT INTO task_events (kind, task_id, type, workflow, data)
    SELECT 'output', new.task_id, t.type, coalesce(t.workflow_id, t.id),
        json_object('id', new.task_id, 'type', t.type, 'attempt', new.attempt, 'pos', new.pos,
                    'text', new.text, 'truncated', json(CASE WHEN new.truncated THEN 'true' ELSE 'false' END))
    FROM tasks t WHERE t.id = new.task_id;
END;

-- A task process's stdout and stderr, per attempt: the last max_log_bytes in chunks.
CREATE TABLE task_logs (
    task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    pos     INTEGER NOT NULL,            -- bytes the attempt wrote before this chunk
    data    BLOB NOT NULL,
    PRIMARY KEY (task_id, attempt, seq)
);
