"""Runs inside a soak test's supervisor process: `taskvisor run` with an event observer
that can stop the supervisor right after a claim.

The test arms a pause by creating the file named by $TVSOAK_ARM. On the next "claimed"
event (the claim is committed and the task handed to the fork server; its pid is not yet
recorded), the observer takes the arm (unlink: one pause per arm), appends "<task id>
<time>" to $TVSOAK_ARM.log and stops its own process with SIGSTOP, so the pause starts at
the exact point of the window, not a scheduler's tick later. The test sends SIGCONT.
It never touches the database and never imports handler code.

Usage: python -m tests.soak.pausing CONFIG [--ready-file PATH]   (--ready-file as for
`taskvisor run`: the test harness waits for that file, never for a log line)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def observer(name: str, fields: dict) -> None:
    arm = os.environ.get("TVSOAK_ARM")
    if name != "claimed" or not arm:
        return
    try:
        os.unlink(arm)
    except FileNotFoundError:
        return
    task = fields.get("task")
    fd = os.open(arm + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{getattr(task, 'id', '?')} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    os.kill(os.getpid(), signal.SIGSTOP)


def main(argv: list[str]) -> int:
    from supervisor import start
    from supervisor.config import load
    p = argparse.ArgumentParser(prog="python -m tests.soak.pausing")
    p.add_argument("config", help="the supervisor's TOML config")
    p.add_argument("--ready-file", metavar="PATH",
                   help="passed on to the supervisor: written once it is ready")
    args = p.parse_args(argv)
    return start.run(load(args.config), events=observer, ready_file=args.ready_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
