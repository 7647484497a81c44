-- 0002: fewer pages written per task.
-- An attempt's row is now written once, when it ends; the running attempt lives in the
-- tasks row. Rows that 0001 opened at claim and never closed describe attempts that are
-- still running (they get a complete row when they end) or were lost (their task row
-- says so): drop them. The partial index on ended_at becomes a plain one.
DELETE FROM attempts WHERE ended_at IS NULL;
DROP INDEX attempts_ended;
CREATE INDEX attempts_ended ON attempts (ended_at);
