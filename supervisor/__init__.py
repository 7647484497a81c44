"""taskvisor, the supervisor side: the durable queue and the process that runs it.

Public names for applications: `Queue` (enqueue, get, list, cancel, retry, wait, stats)
and the error types. This package never imports user code; that is `workers`.
"""

from supervisor.errors import (
    ApiError, ConfigError, DependencyError, InputError, NotFound, StoreError, StoreUnavailable,
    TaskvisorError)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Queue is imported lazily so `import supervisor` stays cheap in forked children.
    if name == "Queue":
        from supervisor.client import Queue
        return Queue
    raise AttributeError(name)


__all__ = ["ApiError", "ConfigError", "DependencyError", "InputError", "NotFound", "Queue",
           "StoreError", "StoreUnavailable", "TaskvisorError", "__version__"]
