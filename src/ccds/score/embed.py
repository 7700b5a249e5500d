"""Embedding similarity: cosine between a sentence encoder's embeddings of pool examples and
of the target's validation examples (default encoder: the embedded all-MiniLM-L6-v2).

Embeddings are L2-normalised, so the mean cosine over a subtask's validation examples is the
dot product with their mean embedding: scoring is |D|×d by d×(subtasks), done in blocks, and
no |D|×|V| matrix is held.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import require
from ..io import track
from ..models import load_sentence_encoder
from ..tokenize import length_batches
from .backend import map_pool
from .base import Method, Params, Pass, Reduce, aggregate_subtasks


class EmbedParams(Params):
    execution = frozenset({"batch_size", "block"})
    model: str = "minilm"
    text: Literal["prompt", "full"] = Field(
        "prompt", description="what is embedded, for pool and V alike (full: prompt + response)")
    batch_size: int = Field(64, ge=1)
    max_len: int = Field(256, ge=1, description="CCDS: 256 tokens")
    reduce: Reduce = "mean"
    block: int = Field(65536, ge=1, description="pool rows per similarity block")


class Embed(Method):
    name = "embed"
    Params = EmbedParams

    def __init__(self, **params):
        super().__init__(**params)
        self._encoder = self._ref = None  # loaded on first use: checking params loads nothing

    def check_installed(self) -> None:
        require("sentence_transformers", "embed", "the embed method")

    def encoder(self):
        if self._encoder is None:
            self._encoder, self._ref = load_sentence_encoder(self.params.model)
            self._encoder.max_seq_length = self.params.max_len
        return self._encoder

    def fingerprint(self) -> str:
        self.encoder()
        return self._ref.fingerprint

    def _texts(self, examples) -> list[str]:
        if self.params.text == "full":
            return [f"{e.prompt}\n{e.response}" for e in examples]
        return [e.prompt for e in examples]

    def _lengths(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        ids = self.encoder().tokenizer(texts, truncation=True, max_length=self.params.max_len)
        ids = ids["input_ids"]
        return ids, np.array([len(x) for x in ids], dtype=np.int64)

    def encode_flops(self, lengths: np.ndarray) -> float:
        """2·N·T for the encoder body plus 4·n_layer·d·L² attention per sequence."""
        body = self.encoder()[0].auto_model
        n = sum(p.numel() for name, p in body.named_parameters()
                if name.startswith("encoder."))
        cfg = body.config
        lengths = lengths.astype(np.float64)
        return float(2 * n * lengths.sum()
                     + 4 * cfg.num_hidden_layers * cfg.hidden_size * (lengths ** 2).sum())

    def cost(self, pool, target) -> float:
        d = self.encoder().get_embedding_dimension()
        n_sub = len(target.subtasks)
        return (self.encode_flops(self._lengths(self._texts(pool))[1])
                + self.encode_flops(self._lengths(self._texts(target.val))[1])
                + 2.0 * len(target.val) * d + 2.0 * len(pool) * n_sub * d)

    def embed(self, texts: list[str], device: torch.device, meter=None) -> np.ndarray:
        """Normalised embeddings, in length-sorted token-budget batches (little padding)."""
        st = self.encoder().to(device)
        ids, lengths = self._lengths(texts)
        out = np.empty((len(texts), st.get_embedding_dimension()), dtype=np.float32)
        pad = st.tokenizer.pad_token_id or 0
        budget = self.params.batch_size * int(np.median(lengths) if len(lengths) else 1)
        with torch.no_grad():
            for index in length_batches(lengths, max(budget, 1), self.params.batch_size):
                width = int(lengths[index].max())
                inp = torch.full((len(index), width), pad, dtype=torch.long)
                mask = torch.zeros_like(inp)
                for r, i in enumerate(index):
                    inp[r, : lengths[i]] = torch.tensor(ids[i])
                    mask[r, : lengths[i]] = 1
                feats = {"input_ids": inp.to(device), "attention_mask": mask.to(device),
                         "token_type_ids": torch.zeros_like(inp).to(device)}
                emb = st(feats)["sentence_embedding"]
                out[index] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
                if meter is not None:
                    meter.add(self.encode_flops(lengths[index]), batch=True)
        return out

    def __getstate__(self) -> dict:  # shipped to a Ray actor without its loaded encoder
        return {**self.__dict__, "_encoder": None, "_ref": None}

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        v = self.embed(self._texts(target.val), ctx.runtime.device, meter)
        means = {name: v[idx].mean(axis=0) for name, idx in target.val_by_subtask().items()}
        meter.add(2.0 * v.size)
        sims = map_pool(Similarity(self, np.stack(list(means.values())).T.copy()), pool, ctx,
                        meter, key=self.key(pool, target, ctx), desc="embed")
        return aggregate_subtasks(sims, self.params.reduce)


class Similarity(Pass):
    """Per example: cosine of its embedding to each subtask's mean V embedding, a block of
    `block` rows at a time, so only block × d embeddings are ever held."""

    def __init__(self, method: Embed, centroids: np.ndarray):
        self.method, self.centroids = method, centroids  # d × subtasks

    def setup(self, runtime) -> None:
        self.method.encoder().to(runtime.device)

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        texts = self.method._texts(examples)
        block = self.method.params.block
        c = torch.from_numpy(self.centroids)
        out = np.empty((len(texts), c.shape[1]), dtype=np.float64)
        for start in track(range(0, len(texts), block), progress):
            e = torch.from_numpy(self.method.embed(texts[start:start + block], runtime.device,
                                                   meter))
            out[start:start + len(e)] = (e @ c).numpy()
        meter.add(2.0 * len(texts) * c.numel())
        return out
