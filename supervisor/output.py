"""What running attempts write for people to read: streamed output and stdout/stderr logs.

Owns the supervisor's buffers of both between passes and the rules for keeping them:
output (`ctx.stream`) is stored in chunks up to `max_output_bytes` a task, cut there
and marked truncated; a task process's stdout and stderr keep their last `max_log_bytes`
per attempt, whatever the task prints (a task that prints 100 MB costs the supervisor
that tail in memory and at most that much written per flush). `flush()` runs inside the
loop's pass transaction, before outcomes are recorded, so an attempt's last output is
stored (and its events sent) before the event of its end. Writes are fenced by the
lease. It never reads a pipe itself and never decides when a pass runs.
"""

from __future__ import annotations

import codecs
import heapq
from dataclasses import dataclass, field

# Output waits at most this long for the pass that stores it: longer means fewer, larger
# chunks and passes that cost less while tasks stream (10 ms: passes with outcomes 1.37x
# slower while 8 tasks streamed 50,000 tokens/s; 50 ms: see benchmarks/README.md).
OUTPUT_FLUSH_S = 0.05
# With many attempts streaming, each one's output waits longer, so that about
# OUTPUT_CHUNKS_PER_S chunks are stored a second in all, up to OUTPUT_MAX_WAIT_S: every
# chunk is a row (and its event) written in the pass, and with 1,000 model calls
# streaming, storing each piece as it came was a fifth of the supervisor's busy time.
OUTPUT_CHUNKS_PER_S = 1000
OUTPUT_MAX_WAIT_S = 1.0
LOG_FLUSH_S = 1.0       # a running attempt's log is stored this often (for --follow)


@dataclass
class _Attempt:
    lease: object
    out_seq: int = 0
    out_chars: int = 0            # characters stored so far (the next chunk's position)
    out_bytes: int = 0            # UTF-8 bytes stored so far, against max_output_bytes
    out_truncated: bool = False
    out_pending: list[str] = field(default_factory=list)
    out_due: float | None = None  # when the pending output is stored (set by its first piece)
    log_seq: int = 0
    log_written: int = 0          # bytes the attempt wrote so far
    log_stored: int = 0           # bytes of those already stored or dropped
    log_pending: bytearray = field(default_factory=bytearray)
    log_since: float | None = None
    ended: bool = False


class LiveOutput:
    """The buffers of every running attempt, keyed by the child's key."""

    def __init__(self, max_output_bytes: int, max_log_bytes: int,
                 chunks_per_s: float = OUTPUT_CHUNKS_PER_S):
        self.max_output_bytes = max_output_bytes
        self.max_log_bytes = max_log_bytes
        self.chunks_per_s = chunks_per_s
        self._attempts: dict[str, _Attempt] = {}
        # When a flush is due, without a look at every attempt in every pass: a heap of
        # (due, key, kind) pushed when an attempt's oldest unsent piece starts waiting
        # (kind 0: output, 1: log); an entry whose attempt has moved on is dropped when it
        # comes to the top. Ended attempts are due at once.
        self._due: list[tuple[float, str, int]] = []
        self._ended: set[str] = set()
        self._staged: list = []   # state changes applied once the transaction committed
        self.dropped_output = 0   # chunks refused: the lease was lost meanwhile

    def configure(self, max_output_bytes: int, max_log_bytes: int) -> None:
        """A reloaded config applies to what is written from now on."""
        self.max_output_bytes, self.max_log_bytes = max_output_bytes, max_log_bytes

    def _get(self, key: str, lease) -> _Attempt:
        att = self._attempts.get(key)
        if att is None:
            att = self._attempts[key] = _Attempt(lease)
        return att

    def on_stream(self, key: str, lease, text, mono: float) -> None:
        """A "stream" message of the attempt: {"text": str}; anything else is ignored."""
        if not isinstance(text, str) or not text:
            return
        att = self._get(key, lease)
        if att.out_truncated:
            return
        att.out_pending.append(text)
        if att.out_due is None:
            att.out_due = mono + self.output_wait()
            heapq.heappush(self._due, (att.out_due, key, 0))

    def output_wait(self) -> float:
        """How long a first piece of output waits to be stored: OUTPUT_FLUSH_S, longer
        when so many attempts write that more than chunks_per_s chunks would be stored a
        second (at most OUTPUT_MAX_WAIT_S)."""
        return min(OUTPUT_MAX_WAIT_S, max(OUTPUT_FLUSH_S, len(self._attempts) / self.chunks_per_s))

    def on_log(self, key: str, lease, data: bytes, mono: float) -> None:
        """A chunk the attempt wrote to stdout or stderr; only the tail is kept."""
        if not data:
            return
        att = self._get(key, lease)
        att.log_written += len(data)
        att.log_pending += data
        excess = len(att.log_pending) - self.max_log_bytes
        if excess > 0:  # older than the tail: never stored
            del att.log_pending[:excess]
            att.log_stored += excess
        if att.log_since is None:
            att.log_since = mono
            heapq.heappush(self._due, (mono + LOG_FLUSH_S, key, 1))

    def end(self, key: str) -> None:
        """The attempt's process is gone: store what is left in the next pass."""
        att = self._attempts.get(key)
        if att is not None:
            att.ended = True
            self._ended.add(key)

    def next_due(self) -> float | None:
        """The monotonic time the next flush is due, or None when nothing waits."""
        if self._ended:
            return 0.0
        heap = self._due
        while heap:
            due, key, kind = heap[0]
            att = self._attempts.get(key)
            if att is not None:
                if kind == 0:
                    if att.out_due == due:
                        return due
                elif att.log_since is not None and att.log_since + LOG_FLUSH_S == due:
                    return due
            heapq.heappop(heap)  # flushed (or its attempt gone) since it was pushed
        return None

    def due(self, mono: float) -> bool:
        t = self.next_due()
        return t is not None and mono >= t

    def flush(self, store, mono: float) -> None:
        """Store what is due, inside the caller's transaction. Nothing here changes until
        `committed()`: if the transaction rolls back, the next flush writes it again."""
        self._staged = []
        for key in self._due_keys(mono):
            att = self._attempts.get(key)
            if att is None:
                continue
            if att.out_pending and (att.ended or mono >= att.out_due):
                self._flush_output(store, att)
            if att.log_pending and (att.ended or mono >= att.log_since + LOG_FLUSH_S):
                self._flush_log(store, att)
            if att.ended:
                self._staged.append(lambda key=key: self._forget(key))

    def _due_keys(self, mono: float) -> list[str]:
        """The attempts that may have something due at `mono`, earliest first: the ended
        ones and those of heap entries due by then (a walk of the heap's top that stops
        at entries not yet due, so it costs per attempt due, not per attempt streaming).
        Stale entries may name an attempt with nothing due: flush looks and moves on.
        The heap is left as it is: a flush that rolls back must find the same entries."""
        heap = self._due
        found: list[tuple[float, str]] = []
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            due, key, _kind = heap[i]
            if due > mono:  # a heap: nothing below this entry is due either
                continue
            found.append((due, key))
            stack.extend(j for j in (2 * i + 1, 2 * i + 2) if j < len(heap))
        found.sort()
        keys = dict.fromkeys(key for _due, key in found)
        keys.update(dict.fromkeys(sorted(self._ended)))
        return list(keys)

    def _forget(self, key: str) -> None:
        self._attempts.pop(key, None)
        self._ended.discard(key)

    def committed(self) -> None:
        """The transaction of the last flush committed: apply what it stored."""
        staged, self._staged = self._staged, []
        for apply in staged:
            apply()

    def _flush_output(self, store, att: _Attempt) -> None:
        # A lone surrogate (valid in JSON, not in UTF-8) becomes "?": SQLite must take it.
        data = "".join(att.out_pending).encode("utf-8", "replace")
        room = self.max_output_bytes - att.out_bytes
        truncated = len(data) > room
        if truncated:
            data = data[:max(room, 0)]
        text = data.decode("utf-8", "ignore")  # a cut inside a character drops it
        data = text.encode("utf-8")
        stored = store.append_output(att.lease, att.out_seq, att.out_chars, text, truncated)
        n = len(att.out_pending)

        def apply() -> None:
            if stored:
                att.out_seq += 1
                att.out_chars += len(text)
                att.out_bytes += len(data)
            else:
                self.dropped_output += 1
            att.out_truncated = truncated
            del att.out_pending[:n]
            att.out_due = None
        self._staged.append(apply)

    def _flush_log(self, store, att: _Attempt) -> None:
        data = bytes(att.log_pending)
        keep_from = att.log_written - self.max_log_bytes
        store.append_log(att.lease, att.log_seq, att.log_stored, data,
                         keep_from_pos=keep_from if keep_from > 0 else None)

        def apply() -> None:
            att.log_seq += 1
            att.log_stored += len(data)
            del att.log_pending[:len(data)]
            att.log_since = None
        self._staged.append(apply)


def log_text(before: list, chunks: list, ended: bool) -> tuple[str, int | None, int | None]:
    """The text of the log `chunks` (an attempt's, in order) read after the chunks
    `before` (the latest the reader had, in order: any three, or all if fewer; empty when
    it had none or they are gone), as (text, start, end), the byte positions the text
    covers. Cut so that the answers to a reader that asks for what follows its last
    chunk, again and again, join at character boundaries: a character the last chunk
    cuts is left for the next answer, which starts with the part of it read before. When
    the attempt has `ended` (it writes no more) nothing is left over, and a broken
    character is U+FFFD. (Each answer decoded on its own turned a character cut between
    two chunks into two U+FFFD: `taskvisor logs --follow --api`.)"""
    head = b""
    if before and (not chunks or _end(before[-1]) == chunks[0].pos):
        context, at = b"", _end(before[-1])
        for c in reversed(before):  # the last 3 bytes, over chunks as short as one byte
            if _end(c) != at or len(context) >= 3:
                break  # (bytes dropped in between: the log keeps its tail)
            context = c.data[-3:] + context
            at = c.pos + len(c.data) - len(c.data[-3:])
        head = _incomplete_end(context)
    if not chunks and not (head and ended):
        return "", None, None
    data = head + b"".join(c.data for c in chunks)
    end = _end(chunks[-1]) if chunks else _end(before[-1])
    if not ended:
        left = len(_incomplete_end(data))
        data, end = data[:len(data) - left], end - left
    return data.decode("utf-8", "replace"), end - len(data), end


def _end(chunk) -> int:
    return chunk.pos + len(chunk.data)


def _incomplete_end(data: bytes) -> bytes:
    """The bytes at the end of `data` that begin a UTF-8 character and do not finish it
    (at most 3; empty when `data` ends at a character boundary or with invalid bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data[-3:])
    return decoder.getstate()[0]
