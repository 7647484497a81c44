"""The protocol between a task process and the supervisor: message kinds and exit codes.

Owns the names both sides agree on. A task process writes newline-delimited JSON
messages on its report pipe (ready, progress, heartbeat, then exactly one of result,
error, retry, cancelled) and leaves with one of the named exit codes. This module must
never import anything outside the standard library: it is loaded in the fork server.
"""

from __future__ import annotations

# The largest packet on the fork server's sockets (supervisor <-> fork server <-> spare);
# a spawn whose spec does not fit inline sends it in a memfd.
MAX_PACKET = 65536

# Message kinds, child -> supervisor.
READY = "ready"          # set-up done, about to run user code
PROGRESS = "progress"    # {"fraction": float|None, "message": str|None}
HEARTBEAT = "heartbeat"  # still alive; nothing else to say
RESULT = "result"        # {"result": <JSON text>}
ERROR = "error"          # {"type", "message", "traceback", "retryable", "outcome"}
RETRY = "retry"          # {"delay_s", "reason"}: reschedule, no attempt spent
CANCELLED = "cancelled"  # the handler stopped after a cancel request

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
