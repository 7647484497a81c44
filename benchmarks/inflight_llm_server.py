"""The model server of inflight_bench.py's chat variant: the repo's OpenAI-compatible test
server (tests/support/openai_server.py) in a process of its own, answering every request
with the same stream of CHUNKS tokens spread over S seconds (a fixed latency).

Usage: python inflight_llm_server.py S [PROCESSES [CHUNKS]]  -> prints its base URL on one line,
serves until SIGTERM. Its listen backlog is raised to the kernel's maximum, so a thousand
clients connecting at once are not dropped into SYN retries. PROCESSES (default 4) copies
of the server listen on the same port (SO_REUSEPORT; the kernel spreads connections): one
Python process with a thread per stream added 0.7 s to a 3 s stream at 1,000 streams at
once by itself (p50, a bare asyncio client, 2 cores: GIL hand-offs between 1,000
threads), which the benchmark's window then measured instead of the queue. Not a test;
not user-facing.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.openai_server import FakeOpenAI, Stream  # noqa: E402

CHUNKS = 10


def main() -> None:
    seconds = float(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else CHUNKS
    text = " ".join(f"token{i}" for i in range(chunks))

    def serve(port: int = 0) -> FakeOpenAI:
        server = FakeOpenAI(default=Stream(text=text, delay_s=seconds / chunks), port=port,
                            reuse_port=True)
        server.httpd.socket.listen(65535)  # capped by net.core.somaxconn
        server.requests = _Counter()       # the test server keeps every request; count them only
        return server
    server = serve()
    for _ in range(processes - 1):  # forked before any thread starts
        if os.fork() == 0:
            from workers.pdeathsig import set_parent_death_signal
            set_parent_death_signal(signal.SIGKILL)
            copy = serve(server.port)
            copy.start()
            signal.pause()
            os._exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    print(server.base_url, flush=True)
    try:
        signal.pause()
    finally:
        server.close()


class _Counter(list):
    """Stands in for FakeOpenAI.requests: counts appends, keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def append(self, item) -> None:
        self.count += 1


if __name__ == "__main__":
    main()
