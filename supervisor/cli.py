"""The `taskvisor` command line: argparse subcommands, and the one place objects are wired.

Owns argument parsing, config discovery for a command (--config, $TASKVISOR_CONFIG,
./taskvisor.toml, built-in defaults; --db overrides the database), output formats (human
tables, --json) and exit codes: 0 ok, 1 the task failed or was cancelled, 2 bad input or
an unusable config/database (one line `taskvisor: error: …` on stderr, nothing written),
124 a wait timed out, 130 interrupted. Commands live in `COMMANDS`; each is a small
`cmd_X(args, config) -> int`. It never writes SQL and never runs a task itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor import __version__
from supervisor import config as _config
from supervisor.client import Queue
from supervisor.errors import ConfigError, InputError, StoreError
from supervisor.store import Status, Task, iso

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
PROG = "taskvisor"


class UsageError(Exception):
    """Bad command-line syntax; printed as one `taskvisor: error:` line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    func: Callable[[argparse.Namespace, _config.Config], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `cmd_X(args, config) -> int` as subcommand `name`."""
    def register(func):
        COMMANDS[name] = Command(func, help, arguments)
        return func
    return register


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _error(str(exc))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        if args.command == "check-config":
            for line in exc.errors:
                _error(line)
            return EXIT_USAGE
        more = len(exc.errors) - 1
        return _error(exc.errors[0] + (f" (and {more} more: run `taskvisor check-config`)"
                                       if more else ""))
    try:
        return COMMANDS[args.command].func(args, cfg)
    except (InputError, StoreError, ConfigError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `taskvisor list | head`: stop quietly, and stop Python's
        # exit-time flush of stdout from raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_TASK_FAILED


def build_parser() -> Parser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subparser.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, type=config_path,
                        help="config file (default: $TASKVISOR_CONFIG, else ./taskvisor.toml)")
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, type=db_path,
                        help="database file (overrides [supervisor] database)")
    parser = Parser(prog=PROG, parents=[common],
                    description="A durable local task queue and process supervisor.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.arguments(sub.add_parser(name, parents=[common], help=cmd.help, description=cmd.help))
    return parser


def _path_of(what: str):
    """The argparse type of a --db or --config value. An empty path used to mean no
    option, so `--db ""` (an unset shell variable) quietly opened ./taskvisor.db and
    `--config ""` read $TASKVISOR_CONFIG or ./taskvisor.toml."""
    def path(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"expected a {what} file path, got an empty string")
        return text
    return path


db_path = _path_of("database")
config_path = _path_of("config")


def load_config(args: argparse.Namespace) -> _config.Config:
    cfg = _config.load(_config.find(getattr(args, "config", None)))
    db = getattr(args, "db", None)
    return cfg if db is None else cfg.with_database(db)


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def _duration(text: str) -> float:
    try:
        return _config.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- commands ------------------------------------------------------------------------------

def _enqueue_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("type", metavar="TYPE")
    p.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?",
                   help="a JSON object, or - to read it from stdin (default {})")
    p.add_argument("--priority", type=int, help="higher runs first (default: the type's)")
    p.add_argument("--delay", type=_duration, metavar="SECONDS", help="run no sooner than this")
    p.add_argument("--timeout", type=_duration, metavar="SECONDS", help="wall-clock limit")
    p.add_argument("--memory-mb", type=int, metavar="N", help="memory limit in MiB")
    p.add_argument("--max-attempts", type=int, metavar="N")
    p.add_argument("--depends-on", action="append", default=[], metavar="ID",
                   help="run only after this task succeeded (repeatable)")
    p.add_argument("--key", metavar="KEY", help="dedupe key: reuse an unfinished task with it")
    p.add_argument("--workflow", metavar="ID", help="join this workflow (default: its own)")
    p.add_argument("--await-event", metavar="NAME",
                   help="stay blocked until `taskvisor send-event NAME` (its data: ctx.event)")
    p.add_argument("--run-on-failure", action="store_true",
                   help="run even when a dependency failed (ctx.inputs holds its error)")
    p.add_argument("--limit-key", action="append", default=[], metavar="KEY",
                   help="also draw from this named limit, e.g. tenant:42 (repeatable)")
    p.add_argument("--estimated-tokens", type=int, metavar="N",
                   help="tokens the claim charges token budgets for this task")


@command("enqueue", "store a task; prints its id", _enqueue_arguments)
def cmd_enqueue(args, cfg) -> int:
    payload = _read_payload(args.payload)
    with Queue(cfg) as queue:
        # --workflow takes what `show` takes, a unique end of an id included
        workflow = None if args.workflow is None else queue.resolve_workflow_id(args.workflow)
        task_id = queue.enqueue(args.type, payload, priority=args.priority, delay=args.delay,
                                timeout_s=args.timeout, memory_mb=args.memory_mb,
                                max_attempts=args.max_attempts, depends_on=args.depends_on,
                                dedupe_key=args.key, workflow_id=workflow,
                                await_event=args.await_event,
                                run_on_failure=args.run_on_failure, limit_keys=args.limit_key,
                                estimated_tokens=args.estimated_tokens)
    print(task_id)
    return EXIT_OK


def _read_payload(arg: str | None):
    return None if arg is None else _read_json(arg, "payload", "payload")


def _read_json(arg: str, what: str, field: str):
    """The JSON value of a command-line argument, or of stdin for "-"; InputError naming
    `what` for text that is not UTF-8 or not JSON (a RecursionError of the parser, for
    input nested too deeply, included: it used to end in a traceback)."""
    if arg == "-":
        try:
            arg = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} on stdin is not UTF-8 text ({exc.reason})", field) from None
    try:
        return json.loads(arg)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}", field=field) from None
    except RecursionError:
        raise InputError(f"{what} is not valid JSON: nested too deeply", field=field) from None


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", help=f"one of {', '.join(Status)}")
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=100, metavar="N")
    p.add_argument("--before", metavar="ID", help="continue after this id (next page)")
    p.add_argument("--workflow", metavar="ID", help="only the tasks of this workflow")
    p.add_argument("--json", action="store_true", help="a JSON array of tasks")


@command("list", "list tasks, newest first", _list_arguments)
def cmd_list(args, cfg) -> int:
    with Queue(cfg, create=False) as queue:
        tasks = queue.list(status=args.status, type=args.type, limit=args.limit,
                           before=args.before, workflow_id=args.workflow)
    if args.json:
        _print_json([t.to_dict(with_history=False) for t in tasks])
        return EXIT_OK
    now = time.time()
    rows = [("ID", "TYPE", "STATUS", "PRI", "ATTEMPTS", "AGE", "OUTCOME / ERROR")]
    rows += [(t.id, t.type, str(t.status), str(t.priority), f"{t.attempts}/{t.max_attempts}",
              _age(now - t.created_at), _truncate(_outcome(t), 60)) for t in tasks]
    if tasks:
        _print_table(rows)
    else:
        print("no tasks", file=sys.stderr)
    return EXIT_OK


_ID_HELP = "a task id, or a unique end of one (the dashboard shows the last 8 characters)"


def _id_arguments(json_option: bool = False):
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("id", metavar="ID", help=_ID_HELP)
        if json_option:
            p.add_argument("--json", action="store_true")
    return arguments


@command("show", "one task with its attempts", _id_arguments(json_option=True))
def cmd_show(args, cfg) -> int:
    with Queue(cfg, create=False) as queue:
        task = queue.get(queue.resolve_id(args.id))
    if args.json:
        _print_json(task.to_dict())
        return EXIT_OK
    now = time.time()
    when = lambda ts: "-" if ts is None else f"{iso(ts)} ({_age(now - ts, signed=True)})"
    limits = _limits(task, cfg)
    status = str(task.status) + (" (cancel requested)" if task.cancel_requested else "")
    fields = [("id", task.id), ("type", task.type), ("status", status),
              ("priority", task.priority), ("attempts", f"{task.attempts}/{task.max_attempts}"),
              ("created", when(task.created_at)), ("run after", when(task.run_after)),
              ("started", when(task.started_at)), ("completed", when(task.completed_at)),
              ("depends on", ", ".join(task.depends_on) or "-"),
              ("workflow", task.workflow + (f" (spawned by {task.parent_id})"
                                            if task.parent_id else "")),
              ("awaits", f"event {task.await_event!r}" if task.await_event else "-"),
              ("dedupe key", task.dedupe_key or "-"), ("limits", limits),
              ("progress", _progress(task)), ("payload", _truncate(_compact(task.payload), 500)),
              ("result", _truncate(_compact(task.result), 500) if task.result is not None else "-"),
              ("outcome", task.outcome or "-"), ("error", task.error or "-")]
    for name, value in fields:
        print(f"{name:<11} {value}")
    print(f"\nhistory ({len(task.history)} attempt{'s' if len(task.history) != 1 else ''}):")
    for a in task.history:
        ended = a.outcome or "running"
        exit_ = (f"signal {a.signal}" if a.signal else
                 f"exit {a.exit_code}" if a.exit_code is not None else
                 "in the model-call relay" if a.ran_in == "relay" else "")
        peak = "-" if a.peak_rss_bytes is None else f"{a.peak_rss_bytes / 1048576:.1f} MiB"
        print(f"  #{a.attempt:<3} {ended:<17} {iso(a.started_at)}  wall {_num(a.wall_s, 's')}"
              f"  cpu {_num(a.cpu_s, 's')}  peak {peak}  {exit_}".rstrip())
        if a.reason:
            print(f"       {_truncate(a.reason, 200)}")
        trace = (a.error or {}).get("traceback") if isinstance(a.error, dict) else None
        if trace:
            for line in str(trace).rstrip("\n").splitlines():
                print(f"       | {line}")
    return EXIT_OK


_LIMITS = (("timeout", "timeout_s", "s"), ("memory", "memory_mb", " MiB"),
           ("cpu", "cpu_s", "s"), ("open files", "open_files", ""))


def _limits(task: Task, cfg: _config.Config) -> str:
    """Each limit the task runs with and where it comes from: the task itself, else its
    type's section, else [defaults] (of the config this command read)."""
    parts = []
    for label, key, unit in _LIMITS:
        own = getattr(task, key, None)
        if own:
            value, origin = own, "task"
        else:
            value, origin = cfg.setting(task.type, key), cfg.origin(task.type, key)
        parts.append(f"{label} {'none' if value is None else _num(value, unit)} ({origin})")
    return ", ".join(parts)


@command("status", "counts by status and type, oldest queued task, supervisors",
         lambda p: p.add_argument("--json", action="store_true"))
def cmd_status(args, cfg) -> int:
    now = time.time()
    with Queue(cfg, create=False) as queue:
        stats, sups = queue.stats(), queue.supervisors()
    lease_s = cfg.supervisor.lease_s
    for s in sups:
        s["stale"] = now - s["heartbeat_at"] > lease_s
    oldest_age = None if stats.oldest_queued_at is None else max(0.0, now - stats.oldest_queued_at)
    if args.json:
        out = {"database": str(cfg.supervisor.database), **stats.to_dict(),
               "oldest_queued_age_s": oldest_age,
               "supervisors": [{**s, "pid_started_at": iso(s["pid_started_at"]),
                                "started_at": iso(s["started_at"]),
                                "heartbeat_at": iso(s["heartbeat_at"])} for s in sups]}
        _print_json(out)
        return EXIT_OK
    totals = stats.totals()
    print(f"database  {cfg.supervisor.database}")
    print("tasks     " + "  ".join(f"{s} {totals[str(s)]}" for s in Status))
    types = sorted({t for by_type in stats.counts.values() for t in by_type})
    if types:
        rows = [("TYPE", *(str(s) for s in Status))]
        rows += [(t, *(str(stats.counts.get(str(s), {}).get(t, 0)) for s in Status)) for t in types]
        print()
        _print_table(rows, indent="  ")
    if oldest_age is None:
        print("\noldest queued: none due")
    else:
        oldest_type = min(stats.oldest_queued_by_type, key=stats.oldest_queued_by_type.get)
        print(f"\noldest queued: {_age(oldest_age)} ({oldest_type})")
    print(f"supervisors: {sum(not s['stale'] for s in sups)} live")
    for s in sups:
        print(f"  {s['owner']}  {s['host']} pid {s['pid']}  pool {s['pool_size']}  "
              f"heartbeat {_age(now - s['heartbeat_at'])} ago{'  STALE' if s['stale'] else ''}")
    return EXIT_OK


def _wait_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", metavar="ID", nargs="+", help=_ID_HELP)
    p.add_argument("--timeout", type=_duration, metavar="SECONDS", help="give up after (exit 124)")


@command("wait", "wait for tasks to finish: exit 0 all succeeded, 1 any failed or was "
         "cancelled, 124 timed out", _wait_arguments)
def cmd_wait(args, cfg) -> int:
    with Queue(cfg, create=False) as queue:
        try:
            ids = [queue.resolve_id(i) for i in args.ids]
            if len(ids) == 1:
                tasks = [queue.wait(ids[0], timeout=args.timeout)]
            else:
                tasks = queue.wait_all(ids, timeout=args.timeout)
        except TimeoutError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT
    code = EXIT_OK
    for task in tasks:
        print(task.status if len(tasks) == 1 else f"{task.id} {task.status}")
        if task.status is not Status.SUCCEEDED:
            print(f"{PROG}: task {task.id} {task.status}: {task.error or task.outcome or '-'}",
                  file=sys.stderr)
            code = EXIT_TASK_FAILED
    return code


def _cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", nargs="?", help=_ID_HELP)
    p.add_argument("--workflow", metavar="ID", help="cancel every unfinished task of this workflow")


@command("cancel", "cancel a task or a whole workflow (running tasks are stopped by their "
         "supervisor)", _cancel_arguments)
def cmd_cancel(args, cfg) -> int:
    if (args.id is None) == (args.workflow is None):
        raise InputError("give a task ID or --workflow ID (one of them)", field="id")
    if args.workflow is not None:
        with Queue(cfg, create=False) as queue:
            done = queue.cancel_workflow(args.workflow)
        print(f"{done['cancelled']} cancelled, {done['stopping']} running asked to stop")
        return EXIT_OK
    with Queue(cfg, create=False) as queue:
        status = queue.cancel(queue.resolve_id(args.id))
    print(status)
    if status is Status.RUNNING:
        print(f"{PROG}: cancel requested; its supervisor will stop it", file=sys.stderr)
    elif status is not Status.CANCELLED:
        print(f"{PROG}: task {args.id} already finished; nothing to cancel", file=sys.stderr)
    return EXIT_OK


def _send_event_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("data", metavar="JSON", nargs="?",
                   help="the event's data, any JSON value (ctx.event), or - for stdin")


@command("send-event", "send a named event: release the tasks that await it (once)",
         _send_event_arguments)
def cmd_send_event(args, cfg) -> int:
    data = None if args.data is None else _read_json(args.data, "event data", "data")
    with Queue(cfg, create=False) as queue:
        sent = queue.send_event(args.name, data)
    if not sent["sent"]:
        print(f"{PROG}: event {args.name!r} was already sent; nothing changed", file=sys.stderr)
    print(f"{len(sent['released'])} task{'' if len(sent['released']) == 1 else 's'} released")
    for task_id in sent["released"]:
        print(task_id)
    return EXIT_OK


@command("retry", "queue a failed or cancelled task again", _id_arguments())
def cmd_retry(args, cfg) -> int:
    with Queue(cfg, create=False) as queue:
        print(queue.retry(queue.resolve_id(args.id)))
    return EXIT_OK


@command("prune", "delete finished tasks older than a duration",
         lambda p: p.add_argument("--older-than", type=_duration, required=True,
                                  metavar="DURATION", help="e.g. 7d, 12h, 30m"))
def cmd_prune(args, cfg) -> int:
    with Queue(cfg, create=False) as queue:
        n = queue.prune(args.older_than)
    print(f"{n} task{'' if n == 1 else 's'} deleted")
    return EXIT_OK


@command("limits", "named limits: budget, use, pause and waiting tasks per key",
         lambda p: p.add_argument("--json", action="store_true"))
def cmd_limits(args, cfg) -> int:
    from supervisor.api import limit_json
    with Queue(cfg, create=False) as queue:
        rows = queue.limits()
    if args.json:
        _print_json([limit_json(r) for r in rows])
        return EXIT_OK
    if not rows:
        print("no limits configured (see [limits] in the config)", file=sys.stderr)
        return EXIT_OK
    now = time.time()
    table = [("KEY", "LIMIT", "RUNNING", "REQUESTS", "TOKENS", "WAITING", "STATE")]
    for r in rows:
        a = r["available"]
        conc = "-" if r["concurrency"] is None else f"{r['running']}/{r['concurrency']}"
        req = "-" if a["requests"] is None else f"{a['requests']:.1f}/{r['burst']:.1f} left"
        tok = "-" if a["tokens"] is None else f"{a['tokens']} left"
        oldest = r["oldest_waiting_at"]
        waiting = str(r["waiting"]) + (f" (oldest {_age(now - oldest)})" if oldest else "")
        state = ("paused " + _age(r["paused_until"] - now) + ": " + (r["pause_reason"] or "")
                 if r["paused_until"] else f"full: {r['blocked_by']}" if r["blocked_by"] else "room")
        table.append((r["key"], r["limit"] or "(none)", conc, req, tok, waiting,
                       _truncate(state, 60)))
    _print_table(table)
    return EXIT_OK


def _schedules_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("pause", "resume"),
                   help="pause or resume the schedule NAME (on every supervisor)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true")


@command("schedules", "list schedules with their last and next fire; pause or resume one",
         _schedules_arguments)
def cmd_schedules(args, cfg) -> int:
    from supervisor.api import schedule_json
    with Queue(cfg, create=False) as queue:  # a typo in --db must not leave a new file
        if args.action:
            if not args.name:
                raise InputError(f"schedules {args.action} needs the schedule's NAME", field="name")
            queue.set_schedule_paused(args.name, args.action == "pause")
        rows = queue.schedules()
    if args.action:
        row = next(r for r in rows if r["name"] == args.name)
        print("paused" if row["paused"] else "running")
        return EXIT_OK
    if args.json:
        _print_json([schedule_json(r) for r in rows])
        return EXIT_OK
    if not rows:
        print("no schedules configured (see [schedules] in the config)", file=sys.stderr)
        return EXIT_OK
    now = time.time()
    when = lambda ts: "-" if ts is None else f"{iso(ts)} ({_age(now - ts, signed=True)})"
    table = [("NAME", "WHEN", "TYPE", "STATE", "LAST FIRE", "NEXT FIRE")]
    for r in rows:
        rule = r["cron"] if r["cron"] else f"every {r['every_s']:g}s"
        if r["timezone"] != "UTC":
            rule += f" {r['timezone']}"
        table.append((r["name"], rule, r["type"], "paused" if r["paused"] else "active",
                      when(r["last_fire_at"]), when(r["next_fire_at"])))
    _print_table(table)
    return EXIT_OK


@command("migrate", "create the database or bring its schema up to date")
def cmd_migrate(args, cfg) -> int:
    from supervisor.store import Connection, latest_version, migrate
    sup = cfg.supervisor
    conn = Connection(sup.database, synchronous=sup.synchronous, busy_timeout_s=sup.busy_timeout_s,
                      max_version=latest_version())
    try:
        start, end = migrate(conn)
    finally:
        conn.close()
    print(f"schema version {start} -> {end}")
    return EXIT_OK


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pidfile", metavar="PATH", help="write the supervisor's pid here")
    p.add_argument("--ready-file", metavar="PATH",
                   help="once ready (database migrated, HTTP bound), write a JSON object "
                        "{pid, owner, http, ready_at} here; removed at a clean exit")


@command("run", "run the supervisor in the foreground until SIGTERM or SIGINT", _run_arguments)
def cmd_run(args, cfg) -> int:
    from supervisor import service, start
    if args.pidfile:
        service.write_pidfile(args.pidfile)
    try:
        return start.run(cfg, ready_file=args.ready_file)
    finally:
        if args.pidfile:
            service.remove_pidfile(args.pidfile)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from supervisor import demo
    demo.add_arguments(p)


@command("demo", "start a supervisor and run an agent-style demo workload", _demo_arguments)
def cmd_demo(args, cfg) -> int:
    from supervisor import demo
    return demo.run(args, cfg)


@command("check-config", "print the effective config, or every error in it")
def cmd_check_config(args, cfg) -> int:
    text = _config.dump(cfg)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


# -- formatting ----------------------------------------------------------------------------

def _print_json(value) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _print_table(rows: list[tuple], indent: str = "") -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _age(seconds: float, signed: bool = False) -> str:
    """45s, 12m, 3h, 2d; with `signed`, "in 5m" for the future and "5m ago" for the past."""
    ahead, s = seconds < 0, abs(seconds)
    text = (f"{s:.0f}s" if s < 60 else f"{s // 60:.0f}m" if s < 3600
            else f"{s // 3600:.0f}h" if s < 86400 else f"{s // 86400:.0f}d")
    if not signed:
        return text
    return f"in {text}" if ahead and s >= 0.5 else f"{text} ago"


def _outcome(task: Task) -> str:
    if task.error:
        prefix = f"{task.outcome}: " if task.outcome and task.outcome != task.status else ""
        return prefix + task.error
    return "" if task.outcome in (None, task.status) else task.outcome


def _progress(task: Task) -> str:
    if task.progress is None and not task.progress_message:
        return "-"
    pct = "" if task.progress is None else f"{task.progress * 100:.0f}% "
    return (pct + (task.progress_message or "")).strip()


def _num(value, unit: str) -> str:
    return "-" if value is None else f"{value:g}{unit}"


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _truncate(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


# The live commands (watch, logs) register themselves in COMMANDS.
from supervisor import watch as _watch  # noqa: E402,F401
