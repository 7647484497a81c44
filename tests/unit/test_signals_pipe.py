"""supervisor.signals: a pass reads the self-pipe only after the selector said it is
readable (no read, and no EAGAIN exception, in a pass without a signal), and no signal is
lost meanwhile: it waits in the pipe for the next drain."""

from __future__ import annotations

import os
import selectors
import signal

import pytest

from supervisor.signals import Signals


@pytest.mark.timeout(10)
def test_drain_reads_only_once_the_selector_reported_the_pipe_readable(monkeypatch):
    sigs = Signals()
    sigs.install()
    reads = []
    real_read = os.read

    def counting_read(fd, n):
        if fd == sigs.read_fd:
            reads.append(fd)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    try:
        assert sigs.drain() == []  # the first pass reads once (start-up)
        assert len(reads) == 1
        assert sigs.drain() == [] and sigs.drain() == []
        assert len(reads) == 1, "a pass without a signal read the pipe"
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        assert sigs.drain() == [], "read before the selector said so"
        with selectors.DefaultSelector() as sel:
            sel.register(sigs, selectors.EVENT_READ)
            ready = sel.select(timeout=5)
        assert [key.fileobj for key, _ in ready] == [sigs]
        sigs.set_readable()
        assert sigs.drain() == [signal.SIGUSR1, signal.SIGHUP]
        assert sigs.drain() == []
    finally:
        sigs.restore()
