#!/usr/bin/env bash
# Create the benchmark's own environment, benchmarks/.env (gitignored), with taskvisor
# (editable, from this checkout) and the peer queues listed in requirements-peers.txt,
# and benchmarks/.env-arq (arq alone, for inflight_bench.py).
# Then: benchmarks/.env/bin/python benchmarks/store_bench.py [--quick]
# Re-running it is cheap: it reuses the venv and only installs what is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
env="$here/.env"
python="${PYTHON:-python3}"

# RQ and Celery need a Redis server on 127.0.0.1 (the supervisor benchmark starts its own).
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x "$env/bin/python" ]; then
    "$python" -m venv "$env"
fi
"$env/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo"
"$env/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-peers.txt"
"$env/bin/python" - <<'PY'
from importlib.metadata import version
print("benchmarks/.env ready:", ", ".join(f"{p} {version(p)}" for p in ("taskvisor", "apsw", "huey", "litequeue", "rq", "celery", "dramatiq", "gevent")))
PY

# arq (inflight_bench.py) pins redis-py < 6 and Celery's kombu needs >= 6.4: arq gets its own
# environment, with only what its worker imports (arq, httpx; inflight_*.py come by PYTHONPATH).
arq_env="$here/.env-arq"
if [ ! -x "$arq_env/bin/python" ]; then
    "$python" -m venv "$arq_env"
fi
"$arq_env/bin/python" -m pip install --quiet --disable-pip-version-check "arq>=0.26" httpx
"$arq_env/bin/python" -c 'import arq; print("benchmarks/.env-arq ready: arq", arq.VERSION)'

