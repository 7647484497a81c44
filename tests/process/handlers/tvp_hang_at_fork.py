"""A preload module that makes every forked task process hang before it can report ready:
an after-fork hook in the fork server runs in each child before taskvisor's own set-up.
Each hung pid is written to $TVP_DIR/pids so the test can clean up whatever escapes."""

import os
import time


def _hang() -> None:
    path = os.environ.get("TVP_DIR")
    if path:
        fd = os.open(os.path.join(path, "pids"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
    time.sleep(120)
    os._exit(0)


os.register_at_fork(after_in_child=_hang)
