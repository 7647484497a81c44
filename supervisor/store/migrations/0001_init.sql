-- 0001: tasks, their dependencies and every attempt.
-- Times are wall-clock epoch seconds (REAL); JSON columns hold text.

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,          -- time-ordered, so id order is FIFO order
    type             TEXT NOT NULL,
    payload          TEXT NOT NULL,             -- JSON object
    priority         INTEGER NOT NULL DEFAULT 0,-- higher runs first
    status           TEXT NOT NULL CHECK (status IN
                        ('blocked','queued','running','succeeded','failed','cancelled')),
    created_at       REAL NOT NULL,
    started_at       REAL,                      -- start of the latest attempt
    completed_at     REAL,                      -- when it reached a final status
    run_after        REAL NOT NULL,             -- not claimed before this time
    attempts         INTEGER NOT NULL DEFAULT 0,-- attempts spent; the fence with lease_owner
    max_attempts     INTEGER NOT NULL DEFAULT 3,
    timeout_s        REAL,                      -- per-task limits; NULL = type, else defaults
    memory_mb        INTEGER,
    cpu_s            REAL,
    lease_owner      TEXT,
    lease_expires_at REAL,
    reserved_mb      INTEGER NOT NULL DEFAULT 0,-- declared memory held while running
    pid              INTEGER,                   -- task process of the current attempt
    pid_started_at   REAL,                      -- its start time, so a reused pid is never hit
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress         REAL,
    progress_message TEXT,
    result           TEXT,                      -- JSON
    error            TEXT,                      -- a sentence a person can act on
    outcome          TEXT,                      -- outcome of the latest attempt
    dedupe_key       TEXT
);

-- The claim: due queued tasks by priority then FIFO. Partial and covering, so its cost
-- does not grow with finished or far-future rows.
CREATE INDEX tasks_claim ON tasks (priority DESC, id, run_after, type) WHERE status = 'queued';
CREATE INDEX tasks_running ON tasks (type, lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_status_type ON tasks (status, type);
CREATE INDEX tasks_finished ON tasks (completed_at) WHERE completed_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_dedupe ON tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('blocked','queued','running');

CREATE TABLE task_deps (
    task_id    TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    depends_on TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, depends_on)
) WITHOUT ROWID;
CREATE INDEX task_deps_depends_on ON task_deps (depends_on, task_id);

CREATE TABLE attempts (
    id             INTEGER PRIMARY KEY,
    task_id        TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    attempt        INTEGER NOT NULL,   -- tasks.attempts at claim time
    owner          TEXT NOT NULL,
    started_at     REAL NOT NULL,
    ended_at       REAL,
    outcome        TEXT,               -- succeeded, error, timeout, memory_limit, crashed, lost,
                                       -- cancelled, interrupted, rescheduled
    reason         TEXT,               -- what happened, for a person
    error          TEXT,               -- JSON {type, message, traceback} when the handler raised
    exit_code      INTEGER,
    signal         TEXT,
    pid            INTEGER,
    peak_rss_bytes INTEGER,
    cpu_s          REAL,
    wall_s         REAL
);
CREATE INDEX attempts_task ON attempts (task_id, id);
CREATE INDEX attempts_ended ON attempts (ended_at) WHERE ended_at IS NOT NULL;

-- Live supervisors: who holds leases, and where to send a wake-up datagram after enqueue.
CREATE TABLE supervisors (
    owner          TEXT PRIMARY KEY,    -- lease_owner of the tasks it runs
    host           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    pid_started_at REAL NOT NULL,
    started_at     REAL NOT NULL,
    heartbeat_at   REAL NOT NULL,
    wake_port      INTEGER,             -- UDP port on 127.0.0.1, NULL = none
    pool_size      INTEGER NOT NULL,
    version        TEXT NOT NULL
);
