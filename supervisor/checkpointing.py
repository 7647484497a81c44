"""ctx.checkpoint on the supervisor side: write the checkpoints the child table received
in the pass's transaction, under each attempt's lease, and answer them after the commit.

A task blocks in ctx.checkpoint until it is answered, so its state is durable when the
call returns. Checkpoints are written before the pass records outcomes, so the last
state of an attempt that ended meanwhile is kept while its lease still holds. It never
writes SQL itself (`Store.checkpoint`) and never reads a task's messages (that is
`supervisor.children`).
"""

from __future__ import annotations

LEASE_LOST = "the attempt no longer holds its lease (another supervisor took the task)"


def write(store, children, now: float) -> list[tuple]:
    """Write every received checkpoint (inside the caller's transaction); returns the
    answers to give once it commits: (child, seq, error or None)."""
    answers = []
    for child in children.checkpointing.values():
        for seq, state in child.checkpoints:
            ok = store.checkpoint(child.lease, state, now)
            answers.append((child, seq, None if ok else LEASE_LOST))
    return answers


def committed(children, answers: list[tuple]) -> None:
    """After the commit: queue each answer (sent with the pass's other acks) and forget
    what was written."""
    for child, seq, error in answers:
        children.ack(child, seq, error)
    for child in children.checkpointing.values():
        child.checkpoints.clear()
    children.checkpointing.clear()
