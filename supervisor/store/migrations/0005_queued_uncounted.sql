-- 0005: queued tasks leave the counts table.
-- Keeping their count made every enqueue write one more b-tree page (the counts row)
-- in its commit, about 15% of a single enqueue's cost. Stats count queued tasks in
-- the scan of the claim index they already make to find the oldest queued task.
-- Every other status is still counted by trigger; the triggers now skip 'queued'.
-- task_types lists every type ever enqueued, so that scan can count all types in one
-- pass without sorting by type; its trigger writes nothing once a type is known.
DROP TRIGGER tasks_count_insert;
DROP TRIGGER tasks_count_delete;
DROP TRIGGER tasks_count_update;
DELETE FROM task_counts WHERE status = 'queued';

CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks WHEN new.status != 'queued' BEGIN
    INSERT INTO task_counts (status, type, n) VALUES (new.status, new.type, 1)
        ON CONFLICT (status, type) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks WHEN old.status != 'queued' BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = old.status AND type = old.type;
END;
CREATE TRIGGER tasks_count_leave AFTER UPDATE OF status ON tasks
WHEN old.status != new.status AND old.status != 'queued' BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = old.status AND type = old.type;
END;
CREATE TRIGGER tasks_count_enter AFTER UPDATE OF status ON tasks
WHEN old.status != new.status AND new.status != 'queued' BEGIN
    INSERT INTO task_counts (status, type, n) VALUES (new.status, new.type, 1)
        ON CONFLICT (status, type) DO UPDATE SET n = n + 1;
END;

CREATE TABLE task_types (type TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT OR IGNORE INTO task_types (type) SELECT DISTINCT type FROM tasks;
CREATE TRIGGER tasks_type_seen AFTER INSERT ON tasks BEGIN
    INSERT OR IGNORE INTO task_types (type) VALUES (new.type);
END;
