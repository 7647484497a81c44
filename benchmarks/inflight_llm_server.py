"""The model server of inflight_bench.py's chat variant: the repo's OpenAI-compatible test
server (tests/support/openai_server.py) in a process of its own, answering every request
with the same stream of CHUNKS tokens spread over S seconds (a fixed latency).

Usage: python inflight_llm_server.py S  -> prints its base URL on one line, serves until
SIGTERM. Its listen backlog is raised to the kernel's maximum, so a thousand clients
connecting at once are not dropped into SYN retries. Not a test; not user-facing.
"""

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.openai_server import FakeOpenAI, Stream  # noqa: E402

CHUNKS = 10


def main() -> None:
    seconds = float(sys.argv[1])
    text = " ".join(f"token{i}" for i in range(CHUNKS))
    server = FakeOpenAI(default=Stream(text=text, delay_s=seconds / CHUNKS))
    server.httpd.socket.listen(65535)  # capped by net.core.somaxconn
    server.requests = _Counter()       # the test server keeps every request; count them only
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
