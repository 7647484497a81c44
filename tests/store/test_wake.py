"""The wake-up hint's sockets stay on loopback: the supervisor's receiving port and the
client's sending socket (an unbound UDP socket that sends is bound to 0.0.0.0 by the
kernel, a port open on every interface for the life of the client)."""

from __future__ import annotations

import os
import socket
import time

from supervisor.store import Store
from supervisor.wake import HOST, WakeSender, WakeSocket
from tests.support import wait_until


def test_wake_sender_binds_to_loopback_and_still_reaches_the_supervisor(db_path):
    wake = WakeSocket()
    store = Store(db_path)
    notifier = WakeSender(store, socket.gethostname())
    try:
        assert wake.sock.getsockname()[0] == HOST
        store.register_supervisor(owner="sup-1", host=socket.gethostname(), pid=os.getpid(),
                                  pid_started_at=0.0, now=time.time(), wake_port=wake.port,
                                  pool_size=1, version="test")
        notifier.notify()
        assert notifier._sock is not None
        assert notifier._sock.getsockname()[0] == "127.0.0.1"
        wait_until(lambda: wake.drain() >= 1, timeout=5, message="no wake-up datagram")
    finally:
        notifier.close()
        store.close()
        wake.close()
