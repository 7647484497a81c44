"""Task ids: the generator lives in `workers.ids` (task processes make the ids of the
tasks they spawn, and workers never import supervisor); the store uses the same one."""

from workers.ids import new_id

__all__ = ["new_id"]
