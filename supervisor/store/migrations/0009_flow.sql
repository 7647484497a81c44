-- 0009: named limits admitted in the claim, recurring schedules.
-- A task that draws from limits carries them (limit_keys: a JSON array of the concrete
-- keys, sorted, so equal sets are equal text: its "limit group"). Queued tasks of no
-- group keep the claim index; queued tasks of a group move to an index that leads with
-- the group, so a claim reaches the head of every group that has room by one seek each
-- and never walks the rows of a group that is full (10,000 tasks waiting on a full
-- limit cost a free limit's claim nothing). Each task sits in exactly one of the two
-- indexes: an enqueue or a claim writes no more b-tree pages than before.
ALTER TABLE tasks ADD COLUMN limit_keys TEXT;
ALTER TABLE tasks ADD COLUMN estimated_tokens INTEGER;   -- what the claim charges token budgets
ALTER TABLE tasks ADD COLUMN schedule TEXT;              -- the schedule that fired it
ALTER TABLE tasks ADD COLUMN scheduled_for REAL;         -- the fire time it stands for

DROP INDEX tasks_claim;
CREATE INDEX tasks_claim ON tasks (priority DESC, id, run_after, type, limit_keys)
    WHERE status = 'queued' AND limit_keys IS NULL;
CREATE INDEX tasks_claim_limited ON tasks (limit_keys, priority DESC, id, run_after, type)
    WHERE status = 'queued' AND limit_keys IS NOT NULL;

-- Groups with queued tasks and the head of each (its best queued task by priority, then
-- id), kept by triggers (tasks of no group never fire them). A claim walks the groups
-- in head order through limit_groups_head and stops at the first whose keys all have
-- room: a full group costs one index entry, however many tasks wait in it.
CREATE TABLE limit_groups (
    keys          TEXT PRIMARY KEY,   -- tasks.limit_keys
    queued        INTEGER NOT NULL,
    head_priority INTEGER,
    head_id       TEXT
) WITHOUT ROWID;
CREATE INDEX limit_groups_head ON limit_groups (head_priority DESC, head_id) WHERE queued > 0;

CREATE TRIGGER tasks_group_insert AFTER INSERT ON tasks
WHEN new.limit_keys IS NOT NULL AND new.status = 'queued' BEGIN
    INSERT INTO limit_groups (keys, queued, head_priority, head_id)
        VALUES (new.limit_keys, 1, new.priority, new.id)
        ON CONFLICT (keys) DO UPDATE SET queued = queued + 1,
            head_priority = CASE WHEN queued <= 0 OR head_id IS NULL
                OR excluded.head_priority > head_priority OR (excluded.head_priority =
                head_priority AND excluded.head_id < head_id)
                THEN excluded.head_priority ELSE head_priority END,
            head_id = CASE WHEN queued <= 0 OR head_id IS NULL
                OR excluded.head_priority > head_priority OR (excluded.head_priority =
                head_priority AND excluded.head_id < head_id)
                THEN excluded.head_id ELSE head_id END;
END;
CREATE TRIGGER tasks_group_enter AFTER UPDATE OF status ON tasks
WHEN new.limit_keys IS NOT NULL AND new.status = 'queued' AND old.status != 'queued' BEGIN
    INSERT INTO limit_groups (keys, queued, head_priority, head_id)
        VALUES (new.limit_keys, 1, new.priority, new.id)
        ON CONFLICT (keys) DO UPDATE SET queued = queued + 1,
            head_priority = CASE WHEN queued <= 0 OR head_id IS NULL
                OR excluded.head_priority > head_priority OR (excluded.head_priority =
                head_priority AND excluded.head_id < head_id)
                THEN excluded.head_priority ELSE head_priority END,
            head_id = CASE WHEN queued <= 0 OR head_id IS NULL
                OR excluded.head_priority > head_priority OR (excluded.head_priority =
                head_priority AND excluded.head_id < head_id)
                THEN excluded.head_id ELSE head_id END;
END;
CREATE TRIGGER tasks_group_leave AFTER UPDATE OF status ON tasks
WHEN old.limit_keys IS NOT NULL AND old.status = 'queued' AND new.status != 'queued' BEGIN
    UPDATE limit_groups SET queued = queued - 1,
        head_priority = CASE WHEN head_id = old.id THEN (SELECT priority FROM tasks
            WHERE status = 'queued' AND limit_keys IS NOT NULL AND limit_keys = old.limit_keys
            ORDER BY priority DESC, id LIMIT 1) ELSE head_priority END,
        head_id = CASE WHEN head_id = old.id THEN (SELECT id FROM tasks
            WHERE status = 'queued' AND limit_keys IS NOT NULL AND limit_keys = old.limit_keys
            ORDER BY priority DESC, id LIMIT 1) ELSE head_id END
        WHERE keys = old.limit_keys;
END;
CREATE TRIGGER tasks_group_delete AFTER DELETE ON tasks
WHEN old.limit_keys IS NOT NULL AND old.status = 'queued' BEGIN
    UPDATE limit_groups SET queued = queued - 1,
        head_priority = CASE WHEN head_id = old.id THEN (SELECT priority FROM tasks
            WHERE status = 'queued' AND limit_keys IS NOT NULL AND limit_keys = old.limit_keys
            ORDER BY priority DESC, id LIMIT 1) ELSE head_priority END,
        head_id = CASE WHEN head_id = old.id THEN (SELECT id FROM tasks
            WHERE status = 'queued' AND limit_keys IS NOT NULL AND limit_keys = old.limit_keys
            ORDER BY priority DESC, id LIMIT 1) ELSE head_id END
        WHERE keys = old.limit_keys;
END;

-- The state of each concrete limit key, shared by every supervisor on the file. Bucket
-- levels are as of updated_at (NULL: full); the claim refills them from `now` it is
-- given. `running` is kept by triggers on every way a task enters or leaves running,
-- so a concurrency limit holds whatever path ended the attempt.
CREATE TABLE limit_state (
    key          TEXT PRIMARY KEY,
    running      INTEGER NOT NULL DEFAULT 0,
    requests     REAL,
    tokens       REAL,
    updated_at   REAL,
    paused_until REAL,
    pause_reason TEXT
) WITHOUT ROWID;

CREATE TRIGGER tasks_limit_start AFTER UPDATE OF status ON tasks
WHEN new.limit_keys IS NOT NULL AND new.status = 'running' AND old.status != 'running' BEGIN
    INSERT INTO limit_state (key, running) SELECT value, 1 FROM json_each(new.limit_keys) WHERE 1
        ON CONFLICT (key) DO UPDATE SET running = running + 1;
END;
CREATE TRIGGER tasks_limit_end AFTER UPDATE OF status ON tasks
WHEN old.limit_keys IS NOT NULL AND old.status = 'running' AND new.status != 'running' BEGIN
    UPDATE limit_state SET running = max(0, running - 1)
        WHERE key IN (SELECT value FROM json_each(old.limit_keys));
END;
CREATE TRIGGER tasks_limit_delete AFTER DELETE ON tasks
WHEN old.limit_keys IS NOT NULL AND old.status = 'running' BEGIN
    UPDATE limit_state SET running = max(0, running - 1)
        WHERE key IN (SELECT value FROM json_each(old.limit_keys));
END;

-- Schedules: pause state and the latest fire time handled (fired or skipped), shared
-- by every supervisor. A fire is claimed by inserting its (name, fire time) row in the
-- transaction that enqueues its task: a second supervisor's insert is ignored.
CREATE TABLE schedules (
    name         TEXT PRIMARY KEY,
    paused       INTEGER NOT NULL DEFAULT 0,
    last_fire_at REAL                 -- NULL: not seen yet (starts from its first sight)
) WITHOUT ROWID;
CREATE TABLE schedule_fires (
    name    TEXT NOT NULL,
    fire_at REAL NOT NULL,
    task_id TEXT NOT NULL,
    PRIMARY KEY (name, fire_at)
) WITHOUT ROWID;
