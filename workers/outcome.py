"""The named exit codes of task processes and of the fork server.

Owns the numbers both sides agree on when a process leaves without a report (the
messages themselves are declared in workers.wire). Standard library only: it is loaded
in the fork server.
"""

from __future__ import annotations

# Exit codes of a task process (beside user code's own sys.exit codes).
EXIT_OK = 0              # an outcome message was sent
EXIT_BOOT_ERROR = 113    # set-up failed before user code ran (limits, spec, pipe)
EXIT_PARENT_GONE = 114   # the fork server (and so the supervisor) was already gone
EXIT_REPORT_FAILED = 115 # the outcome could not be written to the supervisor

EXIT_NAMES = {
    EXIT_BOOT_ERROR: "task process set-up failed before the handler ran",
    EXIT_PARENT_GONE: "the fork server was gone when the task process started",
    EXIT_REPORT_FAILED: "the task process could not send its outcome to the supervisor",
}

# Fork server exit codes.
ZYGOTE_PRELOAD_ERROR = 4  # a preload module or a configured handler failed to import
ZYGOTE_PARENT_GONE = 5
