"""The live commands of the CLI: `taskvisor watch ID` and `taskvisor logs ID`.

Owns following one task in a terminal: its status and progress as lines on stderr, its
streamed output as it arrives on stdout (so `taskvisor watch ID > answer.txt` keeps the
text alone), and its stdout/stderr log, once or followed. Both read the database
directly (polling `PRAGMA data_version`, like `taskvisor wait`), or, with `--api
http://HOST:PORT` or `--api unix:/path`, a running supervisor's API. They never write.
"""

from __future__ import annotations

import sys
import time

from supervisor.cli import EXIT_OK, EXIT_TASK_FAILED, PROG, command
from supervisor.client import Queue
from supervisor.store import FINAL, Status

POLL_S = 0.05      # the database is polled this often (data_version: microseconds)
REREAD_S = 1.0     # and read at least this often


def _api_argument(p) -> None:
    p.add_argument("--api", metavar="ADDRESS", default=None,
                   help="read through a running supervisor: http://HOST:PORT or unix:/path "
                   "(default: read the database)")


def _watch_arguments(p) -> None:
    p.add_argument("id", metavar="ID")
    _api_argument(p)


def _logs_arguments(p) -> None:
    p.add_argument("id", metavar="ID")
    p.add_argument("--attempt", type=int, metavar="N", default=None,
                   help="which attempt (default: the latest that has a log)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing the log as the task runs, through its retries, "
                   "until it finishes (with --attempt: until that attempt ends)")
    _api_argument(p)


def _status_line(status: str, attempt, progress, message, error=None) -> str:
    parts = [f"[{status}]", f"attempt {attempt}" if attempt else ""]
    if progress is not None:
        parts.append(f"{progress * 100:.0f}%")
    if message:
        parts.append(str(message))
    if error and status != "running":
        parts.append(f"- {error}")
    return " ".join(p for p in parts if p)


CUT = "[output cut at max_output_bytes]"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@command("watch", "print a task's status, progress and streamed output live until it ends",
         _watch_arguments)
def cmd_watch(args, cfg) -> int:
    if args.api:
        return _watch_api(args, cfg)
    with Queue(cfg, create=False) as queue:
        task = queue.get(args.id)
        shown, attempt, seq = None, None, -1
        version, read_mono = None, 0.0
        while True:
            line = _status_line(task.status, task.attempts, task.progress,
                                task.progress_message, task.error)
            if line != shown:
                _say(line)
                shown = line
            if task.attempts and task.attempts != attempt:
                attempt, seq = task.attempts, -1
            if attempt is not None:
                for seq, _pos, text, cut in queue._call(
                        lambda s: s.read_output_after(task.id, attempt, seq)):
                    _write(text)
                    if cut:
                        _say(CUT)
            if task.status in FINAL:
                return EXIT_OK if task.status is Status.SUCCEEDED else EXIT_TASK_FAILED
            while True:
                time.sleep(POLL_S)
                latest = queue._call(lambda s: s.data_version())
                if latest != version or time.monotonic() - read_mono >= REREAD_S:
                    version, read_mono = latest, time.monotonic()
                    break
            task = queue.get(args.id)


def _client(args, cfg):
    from supervisor.apiclient import ApiClient
    from supervisor.http import token_path
    token = None
    if not args.api.startswith("unix:"):
        try:
            token = token_path(cfg).read_text().strip()
        except OSError:
            token = None  # reads need none
    return ApiClient(args.api, token=token)


def _watch_api(args, cfg) -> int:
    with _client(args, cfg) as api:
        task, received = api.get(args.id), None  # an unknown id ends here, before a thread
        if task["status"] not in FINAL:
            task, received = _open_stream(api, args.id)
        _say(_status_line(task["status"], task["attempts"], task["progress"],
                          task["progress_message"], task["error"]))
        out = api.output(args.id)
        _write(out["text"])
        if out.get("truncated"):
            _say(CUT)
        if task["status"] in FINAL:  # the output is stored before the outcome: all of it
            return EXIT_OK if task["status"] == "succeeded" else EXIT_TASK_FAILED
        return _follow_stream(received, out)


def _open_stream(api, task_id: str):
    """Open the task's event stream (on a thread), then read the task: whatever changes
    after that read arrives as an event. (Read before the stream opened, a task that
    ended in between left `watch` waiting for ever for an end it had missed.)
    Returns (task, queue of the stream's events, or of the exception that ended it)."""
    import queue as _queue
    import threading
    received: _queue.Queue = _queue.Queue()
    opened = threading.Event()

    def pump() -> None:
        try:
            for item in api.events(task=task_id, on_open=opened.set):
                received.put(item)
        except Exception as exc:  # the CLI's main thread reports it
            received.put(exc)
            opened.set()
    threading.Thread(target=pump, daemon=True).start()
    opened.wait()
    return api.get(task_id), received


def _follow_stream(received, out: dict) -> int:
    """Print the stream's output after what `out` held, and status lines, until the end.
    An output event at or before what was read is skipped, so nothing falls between, and
    so is one of an earlier attempt than the one shown (arriving late, it started the
    shown text over: printed twice). A cut is said, as `watch` without --api says it."""
    attempt, pos = out["attempt"], len(out["text"])
    while True:
        item = received.get()
        if isinstance(item, Exception):
            raise item
        _ev_id, kind, data = item
        if kind == "output":
            if attempt is not None and data["attempt"] < attempt:
                continue
            if data["attempt"] != attempt:
                attempt, pos = data["attempt"], 0
            if data["pos"] + len(data["text"]) > pos:
                _write(data["text"][max(0, pos - data["pos"]):])
                pos = data["pos"] + len(data["text"])
                if data.get("truncated"):
                    _say(CUT)
        elif kind == "task":
            _say(_status_line(data["status"], data["attempt"], data["progress"],
                              data["message"], data["error"]))
            if data["status"] in FINAL:
                return EXIT_OK if data["status"] == "succeeded" else EXIT_TASK_FAILED


@command("logs", "print the tail of a task's stdout and stderr (--follow: as it runs)",
         _logs_arguments)
def cmd_logs(args, cfg) -> int:
    # Imported here: supervisor.api (with the OpenAPI document, ~38 ms) loaded at every
    # CLI start when this module imported it at the top.
    from supervisor.api import MAX_INDEX
    if args.attempt is not None and not 1 <= args.attempt <= MAX_INDEX:
        # past 64 bits SQLite's binding raised OverflowError: a traceback
        from supervisor.errors import InputError
        raise InputError(f"--attempt must be from 1 to {MAX_INDEX}", field="attempt")
    if args.api:
        with _client(args, cfg) as api:
            printed: dict = {}  # attempt -> the byte position printed up to
            return _follow(lambda after, attempt: _api_log(api, args.id, attempt, after, printed),
                           lambda: api.get(args.id), args)
    with Queue(cfg, create=False) as queue:
        def chunks(after, attempt):
            attempts = queue._call(lambda s: s.log_attempts(args.id))
            attempt = attempt or (attempts[-1] if attempts else None)
            if attempt is None:
                return None, []
            got = queue._call(lambda s: s.read_log(args.id, attempt, after))
            return attempt, [(c.seq, c.data) for c in got]
        return _follow(chunks, lambda: queue.get(args.id).to_dict(), args)


def _api_log(api, task_id: str, attempt, after, printed: dict):
    """The answer's text, unless it ends where what was printed ends: an answer may start
    with a character the one before held back (cut between two chunks), and asked again
    with the same `after_seq` it comes again (an attempt whose log ends in half a
    character: its U+FFFD was printed twice)."""
    body = api.logs(task_id, attempt=attempt, after_seq=after)
    data = body["text"].encode()
    end = body.get("end")
    if end is not None:
        if end <= printed.get(body["attempt"], -1):
            data = b""
        else:
            printed[body["attempt"]] = end
    return body["attempt"], ([(body["seq"], data)] if data else [])


def _follow(chunks, task, args) -> int:
    """Print the log; with --follow, poll for new chunks until the task has finished
    (a retry's attempt follows the one before it, after an "[attempt N]" line on
    stderr), or, with --attempt N, until attempt N has ended. (It followed only the first
    attempt it saw, waited through the retry's backoff, and left when the next attempt
    started, without a line of it.) The task is read before the chunks: when it says an
    attempt has ended, the chunks read after it hold all that attempt stored."""
    task_now = task()
    attempt, after = args.attempt, -1
    out = sys.stdout.buffer
    while True:
        attempt, got = chunks(after, attempt)
        for seq, data in got:
            out.write(data)
            after = seq
        out.flush()
        if not args.follow:
            if attempt is None:
                _say(f"{PROG}: task {args.id} has no log yet")
            return EXIT_OK
        status, current = task_now["status"], task_now["attempts"] or 0
        if status not in ("running", "queued", "blocked"):
            return EXIT_OK
        if args.attempt is not None:
            if current > args.attempt or (current == args.attempt and status != "running"):
                return EXIT_OK
        elif attempt is not None and current > attempt:
            attempt, after = current, -1
            _say(f"[attempt {current}]")
            continue
        time.sleep(0.5)
        task_now = task()
