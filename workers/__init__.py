"""taskvisor, the worker side: the handler API and everything that runs user code.

    from workers import task, TaskContext, Retry

    @task("embed.files")
    def embed(payload: dict, ctx: TaskContext) -> dict: ...

This package runs in the fork server and in task processes. It must stay lean (standard
library only at import time) and must never open the task database.
"""

from workers.context import Fail, Retry, TaskCancelled, TaskContext
from workers.registry import task, warm_up
from workers.workflow import DependencyFailure, SpawnError

__all__ = ["DependencyFailure", "Fail", "Retry", "SpawnError", "TaskCancelled", "TaskContext",
           "task", "warm_up"]
