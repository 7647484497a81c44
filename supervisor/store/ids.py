"""Task ids: the generator lives in `workers.ids` (task processes make the ids of the
tasks they spawn, and workers never import supervisor); the store uses the same one."""

from workers.ids import is_task_id, new_id

__all__ = ["is_task_id", "new_id"]
