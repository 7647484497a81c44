"""`taskvisor demo`: a supervisor on a fresh database, an agent run, and a task ending
in each outcome, shown live in the terminal and on the dashboard.

Owns the demo's plan and its display: it writes a config and a fresh SQLite file (in a
new temporary folder unless --db names a path that does not exist yet), starts a
supervisor as a subprocess, enqueues the agent run (a `plan` that spawns one research
step per topic it decides, a summary that reads their results from ctx.inputs, and a
publish step that waits for an approval event; one research step is killed mid-way and
resumes from its checkpoint; the model is the server of TASKVISOR_LLM__BASE_URL when set,
else the offline stand-in) plus tasks at three priorities and tasks that are retried,
time out, hit their memory limit, crash and are cancelled; sends the approval itself
after a few seconds (or prints the command, with --approve-manually); redraws a live
table (plain lines when stdout is not a terminal), prints a summary, then stops the
supervisor with SIGTERM (or, with --keep-running, leaves it up until Ctrl-C). Its
supervisor never outlives it: TERM, HUP or Ctrl-C to the demo stop it the same way, and
a parent-death signal stops it if the demo is killed outright. It runs no task itself,
never writes SQL (it uses `Queue`) and never imports user code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor.client import Queue
from supervisor.config import toml_string
from supervisor.store import FINAL, Task

DEFAULT_LISTEN = "127.0.0.1:9464"
DEADLINE_S = 120.0          # the demo gives up (exit 1) if tasks are still unfinished then
REFRESH_S = 0.5
ROOT = Path(__file__).resolve().parent.parent
TOPIC = "running LLM agents reliably on one machine"
APPROVAL_EVENT = "approve-publish"
APPROVE_AFTER_S = 2.0       # the demo approves the publish step this long after it waits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-running", action="store_true",
                   help="after the summary, leave the supervisor running (to browse the "
                        "dashboard) until Ctrl-C")
    p.add_argument("--approve-manually", action="store_true",
                   help="do not approve the publish step: print the command that does")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help=f"the dashboard address (default: [http] listen, else {DEFAULT_LISTEN}; "
                        '"" for none)')
    if not any("--db" in a.option_strings for a in p._actions):  # the CLI's common --db
        from supervisor.cli import db_path
        p.add_argument("--db", metavar="PATH", type=db_path,
                       help="a new database file for the demo (default: a temporary folder)")


def run(args=None, config=None) -> int:
    """Run the demo; returns the exit code (0: every task ended as planned and the
    supervisor stopped). `args`: argv strings, an argparse Namespace (from the CLI), or
    None for sys.argv[1:]. `config`: the CLI's Config, for [http] listen and [llm]."""
    if args is None or isinstance(args, (list, tuple)):
        parser = argparse.ArgumentParser(prog="taskvisor demo", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    demo = Demo(db=getattr(args, "db", None), listen=getattr(args, "listen", None),
                keep_running=bool(getattr(args, "keep_running", False)), config=config,
                approve_manually=bool(getattr(args, "approve_manually", False)))
    return demo.main()


class _Stopped(Exception):
    """TERM or HUP reached the demo: stop its supervisor, then exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def _start_new_session_tied_to_us() -> None:
    """In the supervisor's process, before exec: its own session (Ctrl-C in the terminal
    reaches the demo, which stops it in order), and SIGTERM when the demo dies by any means
    (kill -9 included), so it never keeps the port."""
    from workers.pdeathsig import set_parent_death_signal
    os.setsid()
    set_parent_death_signal(signal.SIGTERM)


class Demo:
    def __init__(self, *, db, listen, keep_running: bool, config=None,
                 approve_manually: bool = False):
        self.out = sys.stdout
        self.tty = self.out.isatty()
        self.keep_running = keep_running
        self.db_option = Path(db).resolve() if db else None
        self.folder = self.db = None
        self.llm = _llm_settings(config)
        self.listen = _listen(listen, config)
        self.proc: subprocess.Popen | None = None
        self.queue: Queue | None = None
        self.names: dict[str, str] = {}
        self.seen: dict[str, str] = {}
        self.drawn = 0
        self.cancel_id: str | None = None
        self.approve_manually = approve_manually
        self.waiting_since: float | None = None  # when publish became ready for approval
        self.approved = False

    def main(self) -> int:
        previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return self._main()
        except _Stopped as stop:  # before the supervisor started, or after it stopped
            self.stop()
            return 128 + stop.signum
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _main(self) -> int:
        if self.db_option is not None and self.db_option.exists():
            return self.fail(f"{self.db_option} already exists: the demo needs a new database "
                             "file (give another --db, or leave it out for a temporary folder)")
        if self.db_option is not None and not _utf8(str(self.db_option)):
            return self.fail(f"{self.db_option}: the path is not UTF-8, so the demo's TOML "
                             "config cannot name it; choose another --db")
        self.folder = Path(tempfile.mkdtemp(prefix="taskvisor-demo-"))
        self.db = self.db_option or self.folder / "demo.db"
        model = (f"llm.chat at {self.llm['base_url']}" if self.llm else "the offline stand-in "
                 "(demo.offline_llm; set TASKVISOR_LLM__BASE_URL to use a real server)")
        self.say(f"taskvisor demo: a supervisor, an agent-style workflow and every outcome.\n"
                 f"  database   {self.db}\n  files      {self.folder} (config, supervisor.log)\n"
                 f"  model      {model}")
        try:
            self.start()
            if not self.wait_ready():
                return self.fail("the supervisor did not start:\n" + self.log_tail())
            self.say(f"  dashboard  {self.dashboard()}\n")
            self.enqueue()
            finished = self.watch()
            self.summary()
            if self.keep_running and finished:
                self.say(f"\nThe supervisor keeps running: dashboard {self.dashboard()}; "
                         "press Ctrl-C to stop it.")
                try:
                    while self.proc.poll() is None:
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    self.say("")
            ok = finished and self.as_planned()
        except KeyboardInterrupt:
            self.say("\ninterrupted")
            ok = False
        except _Stopped as stop:
            self.say(f"\n{signal.Signals(stop.signum).name}: stopping the demo's supervisor")
            self.stop()
            self.say(self.afterwards())
            return 128 + stop.signum
        finally:
            self.stop()
        self.say(self.afterwards())
        return 0 if ok else 1

    def afterwards(self) -> str:
        """The last lines: what still exists once the supervisor has stopped."""
        db = shlex.quote(str(self.db))  # commands to paste: a path with a space stays one word
        lines = [f"\nThe tasks stay in {self.db}; look at them with",
                 f"  taskvisor list --db {db}",
                 f"  taskvisor show --db {db} ID      (an id from the list, or its last 8 characters)"]
        if not self.keep_running:
            lines.append("The dashboard stopped with the supervisor: run `taskvisor demo "
                         "--keep-running` to browse it until Ctrl-C.")
        return "\n".join(lines)

    # -- the supervisor -------------------------------------------------------------------

    def start(self) -> None:
        q = toml_string
        cfg = self.folder / "taskvisor.toml"
        # Every string through toml_string: a --db path holding " or \ was written
        # between bare quotes, and `run` refused the file (or read another path).
        llm = "".join(f"{k} = {q(v)}\n" for k, v in (self.llm or {}).items() if v)
        preload = '"workers.handlers.demo"' + (', "workers.handlers.llm"' if self.llm else "")
        cfg.write_text(
            f"[supervisor]\ndatabase = {q(str(self.db))}\npool_size = 4\npreload = [{preload}]\n"
            "poll_interval_s = 0.25\nlease_s = 15\nshutdown_grace_s = 3\nkill_grace_s = 1\n\n"
            "[defaults]\ntimeout_s = 120\nmax_attempts = 3\nbackoff_initial_s = 0.5\n"
            "backoff_max_s = 2\n\n"
            f"[http]\nlisten = {q(self.listen)}\n\n" + (f"[llm]\n{llm}" if llm else ""),
            encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISOR_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.ready_path = self.folder / "ready.json"
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(cfg),
                "--ready-file", str(self.ready_path)]
        self.log_path = self.folder / "supervisor.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=self.folder, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_start_new_session_tied_to_us)
        self.queue = Queue(str(cfg))

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.ready_path.exists():  # written once migrated and serving
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        if self.queue is not None:
            self.queue.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            from supervisor import proctree
            proctree.kill_tree(self.proc.pid)  # its group, and any setsid() escapee below it
            self.proc.wait()
        self.say(f"supervisor stopped (exit code {self.proc.returncode}).")

    def dashboard(self) -> str:
        if not self.listen:
            return "off (--listen \"\")"
        host, port = self.listen.rsplit(":", 1)
        url = f"http://{host}:{port}/"
        for _ in range(20):
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=0.5).close()
                return url
            except OSError:
                time.sleep(0.1)
        return f"{url} (not answering yet: see {self.log_path})"

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # -- the work -------------------------------------------------------------------------

    def enqueue(self) -> None:
        items = self.plan()
        ids = self.queue.enqueue_many(items)
        for item, task_id in zip(items, ids):
            self.names[task_id] = item["payload"]["demo"]
            if item["payload"]["demo"] == "cancelled on request":
                self.cancel_id = task_id
        self.say(f"enqueued {len(ids)} tasks; the pool runs 4 at a time.\n")

    def plan(self) -> list[dict]:
        agent = {"demo": "research: plan", "topic": TOPIC, "llm": bool(self.llm),
                 "approval_event": APPROVAL_EVENT, "die_once": str(self.folder / "die-once")}
        if not self.llm:
            agent["busy_once"] = str(self.folder / "busy-once")
        items = [{"type": "demo.plan", "priority": 10, "payload": agent}]
        for level, priority in (("high", 8), ("normal", 0), ("low", -5)):
            for n in (1, 2):
                items.append({"type": "demo.sleep", "priority": priority,
                              "payload": {"demo": f"batch {level} priority #{n}", "seconds": 3}})
        items += [
            {"type": "demo.flaky", "payload": {"demo": "fails once, then retried"}},
            {"type": "demo.sleep", "timeout_s": 2, "max_attempts": 1,
             "payload": {"demo": "runs past its time limit", "seconds": 30}},
            {"type": "demo.hog", "memory_mb": 160, "max_attempts": 1,
             "payload": {"demo": "over its memory limit"}},
            {"type": "demo.crash", "max_attempts": 1, "payload": {"demo": "crashes (SIGSEGV)"}},
            {"type": "demo.sleep", "priority": -5,
             "payload": {"demo": "cancelled on request", "seconds": 30}},
        ]
        return items

    def watch(self) -> bool:
        """Refresh until every task is finished; False if the deadline or the supervisor's
        death came first."""
        started = time.monotonic()
        while True:
            tasks = self.queue.list(limit=1000)  # the demo's own file: every task is ours
            for t in tasks:  # the spawned ones too
                self.names.setdefault(t.id, str(t.payload.get("demo", t.type)))
            tasks.sort(key=lambda t: t.id)
            self.cancel_when_running(tasks)
            self.approve_when_waiting(tasks)
            self.show(tasks, time.monotonic() - started)
            if tasks and all(t.status in FINAL for t in tasks):
                return True
            if self.proc.poll() is not None:
                self.say(f"the supervisor exited ({self.proc.returncode}):\n{self.log_tail()}")
                return False
            if time.monotonic() - started > DEADLINE_S and not (
                    self.approve_manually and not self.approved):
                self.say(f"gave up after {DEADLINE_S:g}s with tasks unfinished")
                return False
            time.sleep(REFRESH_S)

    def cancel_when_running(self, tasks: list[Task]) -> None:
        for t in tasks:
            if t.id == self.cancel_id and t.status == "running" and t.started_at \
                    and time.time() - t.started_at > 2:
                self.queue.cancel(t.id)
                self.cancel_id = None

    def approve_when_waiting(self, tasks: list[Task]) -> None:
        """Send the publish step's approval APPROVE_AFTER_S after it became the only thing
        it waits for (or, with --approve-manually, print the command once)."""
        if self.approved:
            return
        waiting = [t for t in tasks if t.await_event and t.status == "blocked"]
        done = {t.id for t in tasks if t.status == "succeeded"}
        ready = [t for t in waiting if all(d in done for d in self.queue.get(t.id).depends_on)]
        if not ready:
            return
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
            if self.approve_manually:
                self.say(f"\n{self.names[ready[0].id]} waits for approval; send it with:\n"
                         f"  taskvisor send-event {APPROVAL_EVENT} '{{\"by\": \"you\"}}' "
                         f"--db {shlex.quote(str(self.db))}\n(or the button on the dashboard)\n")
                self.drawn = 0
        if not self.approve_manually and time.monotonic() - self.waiting_since >= APPROVE_AFTER_S:
            self.queue.send_event(APPROVAL_EVENT, {"by": "taskvisor demo", "after_s": APPROVE_AFTER_S})
            self.approved = True

    # -- display --------------------------------------------------------------------------

    def show(self, tasks: list[Task], elapsed: float) -> None:
        if self.tty:
            lines = [f"{elapsed:5.1f}s  " + _counts(tasks), ""] + _table(
                [("task", "type", "pri", "status", "att", "progress", "time")],
                [self.live_row(t) for t in tasks])
            text = (f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines)
            self.say(text)
            self.drawn = len(lines)
            return
        for t in tasks:  # plain output: one line per change of status
            state = str(t.status) + (f" ({t.outcome})" if t.status in ("failed", "cancelled")
                                     and t.outcome != str(t.status) else "")
            if self.seen.get(t.id) != state:
                self.seen[t.id] = state
                self.say(f"{elapsed:6.1f}s  {self.names[t.id]:<30} {state}")

    def live_row(self, t: Task) -> tuple:
        if t.status == "running":
            bar = _bar(t.progress) + " " + (t.progress_message or "")[:28]
            took = time.time() - (t.started_at or time.time())
        else:
            bar = t.outcome or ""
            took = (t.completed_at - t.started_at) if t.completed_at and t.started_at else None
        return (self.names[t.id], t.type, t.priority, _color(str(t.status)), t.attempts, bar,
                "" if took is None else f"{took:.1f}s")

    def summary(self) -> None:
        rows = []
        tasks = [self.queue.get(task_id) for task_id in self.names]
        first = min(self.names)  # the plan: its workflow's tasks come first
        for t in sorted(tasks, key=lambda t: (t.workflow != first, t.id)):
            name = self.names[t.id]
            outcomes = " > ".join(a.outcome or "?" for a in t.history) or (t.outcome or "-")
            wall = sum(a.wall_s or 0 for a in t.history)
            peak = max((a.peak_rss_bytes or 0 for a in t.history), default=0)
            rows.append((name, t.type, t.priority, _color(str(t.status)), outcomes, t.attempts,
                         f"{wall:.1f}s", f"{peak / 2**20:.0f} MiB" if peak else "-", _note(t)))
        self.say("\nSummary")
        self.say("\n".join(_table([("task", "type", "pri", "status", "attempt outcomes", "att",
                                    "time", "peak mem", "workflow")], rows)))
        self.say(f"\ndatabase: {self.db}")

    def as_planned(self) -> bool:
        tasks = [self.queue.get(i) for i in self.names]
        expected = {"runs past its time limit": "timeout", "over its memory limit": "memory_limit",
                    "crashes (SIGSEGV)": "crashed", "cancelled on request": "cancelled"}
        wrong = [f"{self.names[t.id]}: {t.status}/{t.outcome}" for t in tasks
                 if (t.outcome != expected[self.names[t.id]] if self.names[t.id] in expected
                     else t.status != "succeeded")]
        if wrong:
            self.say("not as planned: " + "; ".join(wrong))
        return not wrong

    def say(self, text: str) -> None:
        if self.out is None:
            return
        try:
            print(text, file=self.out, flush=True)
        except BrokenPipeError:  # `taskvisor demo | head`: go on quietly, still clean up
            self.out = None

    def fail(self, message: str) -> int:
        print(f"taskvisor: error: {message}", file=sys.stderr, flush=True)
        return 1


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes of a name that is not UTF-8
        return False
    return True


def _llm_settings(config) -> dict | None:
    """[llm] of the CLI's config (else of the defaults), environment overrides and their
    short aliases applied by `config.load`; None when no base URL is set."""
    from supervisor.config import load
    llm = (config if config is not None else load(None)).llm
    if not llm.base_url:
        return None
    return {"base_url": llm.base_url, "model": llm.model or "", "api_key_env": llm.api_key_env or ""}


def _listen(requested, config) -> str:
    """The dashboard address: as asked, else the config's, else the default; a busy port
    is swapped for a free one (a real supervisor may be using 9464)."""
    listen = requested if requested is not None else getattr(getattr(config, "http", None), "listen", None)
    listen = DEFAULT_LISTEN if listen is None else listen
    if not listen:
        return ""
    host, port = listen.rsplit(":", 1)
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
        try:
            s.bind((host.strip("[]"), int(port)))
            return listen
        except OSError:
            s.bind((host.strip("[]"), 0))
            return f"{host}:{s.getsockname()[1]}"


def _note(t: Task) -> str:
    """What the agent run did in this task, for the summary's last column."""
    r = t.result if isinstance(t.result, dict) else {}
    if t.type == "demo.plan":
        return f"decided {len(r.get('topics', []))} topics, spawned {len(r.get('research', [])) + 2}"
    if t.type == "demo.research":
        if r.get("resumed_from"):
            return f"killed mid-way, resumed from checkpoint (step {r['resumed_from']})"
        return "spawned by plan"
    if t.type == "demo.summary":
        return f"read {len(r.get('sources', []))} results from ctx.inputs"
    if t.type == "demo.publish":
        by = (r.get("approval") or {}).get("by") if r else None
        return f"approved by {by}" if by else ("waits for approval" if t.status == "blocked" else "")
    return ""


def _counts(tasks: list[Task]) -> str:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[str(t.status)] = counts.get(str(t.status), 0) + 1
    order = ("blocked", "queued", "running", "succeeded", "failed", "cancelled")
    return "  ".join(f"{s} {counts[s]}" for s in order if counts.get(s))


def _bar(fraction, width: int = 10) -> str:
    if fraction is None:
        return "[" + "~" * width + "]"
    filled = int(round(min(1.0, max(0.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


_COLORS = {"succeeded": 32, "failed": 31, "running": 33, "cancelled": 35}


def _color(status: str) -> str:
    code = _COLORS.get(status)
    return f"\x1b[{code}m{status}\x1b[0m" if code and sys.stdout.isatty() else status


def _table(header: list[tuple], rows: list[tuple]) -> list[str]:
    def width(cell) -> int:
        text = str(cell)
        return len(text) - (9 if text.startswith("\x1b[") else 0)

    all_rows = header + rows
    widths = [max(width(r[i]) for r in all_rows) for i in range(len(header[0]))]
    return ["  ".join(str(c) + " " * (w - width(c)) for c, w in zip(r, widths)).rstrip()
            for r in all_rows]
