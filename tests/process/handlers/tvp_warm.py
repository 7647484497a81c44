"""Two @warm_up functions: one appends this process's pid to TVP_DIR/warm.pids
(where, and how often, warm-ups run), one fails (the fork server must start anyway). A
task returns its own pid and its parent's."""

import os

from workers import task, warm_up


@warm_up
def note_pid():
    with open(os.path.join(os.environ["TVP_DIR"], "warm.pids"), "a") as f:
        f.write(f"{os.getpid()}\n")


@warm_up
def fails():
    raise ValueError("tvp_warm fails to warm up on purpose")


@task("t.warm")
def warm(payload, ctx):
    return {"pid": os.getpid(), "ppid": os.getppid()}
