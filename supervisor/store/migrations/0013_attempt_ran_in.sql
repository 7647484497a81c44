-- 0013: where each attempt ran: 'process' (a task process forked by the fork server) or
-- 'relay' (an llm.chat attempt hosted by the model-call relay, workers.hosting, where the
-- attempt's memory_mb and cpu_s do not apply). NULL: not known (rows written before this
-- migration, and attempts another supervisor's rescue ended). Before it, a hosted attempt
-- showed only by its NULL pid.
ALTER TABLE attempts ADD COLUMN ran_in TEXT;
