"""Examples -> token ids with a response mask, and length-sorted batches.

Loss is only ever taken on response tokens. A chat template is used when the tokenizer has
one (the template is rendered once around placeholders, then filled per example, which
skips a Jinja render per example and is checked against one); otherwise plain
`prompt\\n response<eos>`. Batches are left-padded and grouped by length so padding costs
little, and so every row's response ends at the last position (see `lm.response_nll`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .data.types import Example

_P, _R = "\x00CCDS_PROMPT\x00", "\x00CCDS_RESPONSE\x00"


@dataclass
class Encoded:
    """Token ids per sequence; the response starts at `n_prompt[i]`."""

    ids: list[np.ndarray]
    n_prompt: np.ndarray
    n_suffix: np.ndarray  # end-of-turn tokens closing each response (trained, not scored)
    truncated: int = 0  # sequences cut to max_len
    tokens_cut: int = 0  # tokens removed by truncation
    empty: list[int] = field(default_factory=list)  # sequences left with no response token

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    @property
    def response_lengths(self) -> np.ndarray:
        """Response tokens including the end-of-turn suffix (what training sees)."""
        return self.lengths - self.n_prompt

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def summary(self) -> dict:
        lengths = self.lengths
        return {"sequences": len(self), "tokens": int(lengths.sum()),
                "response_tokens": int(self.response_lengths.sum()),
                "max_len": int(lengths.max(initial=0)), "truncated": self.truncated,
                "tokens_cut": self.tokens_cut, "no_response_left": len(self.empty)}


class Formatter:
    """Renders prompt/response text for one tokenizer, with optional k-shot examples."""

    def __init__(self, tokenizer, shots: Sequence[Example] = (), system: str | None = None):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.shots = list(shots)
        self.system = system
        if self.chat:
            head = self._render(_P, None)
            full = self._render(_P, _R)
            pre, _, rest = full.partition(_P)
            mid, _, post = rest.partition(_R)
            self._fast = head == pre + _P + mid and all(_P not in s and _R not in s
                                                   for s in (pre, mid, post))
            self._pre, self._mid, self._post = pre, mid, post

    def render(self, prompt: str, response: str) -> tuple[str, str, str]:
        """(prompt, response, end-of-turn suffix) texts; concatenated, the full sequence."""
        if not self.chat:
            bos = (self.tok.bos_token or "") if getattr(self.tok, "add_bos_token", False) else ""
            shots = "".join(f"{s.prompt}\n{s.response}\n\n" for s in self.shots)
            return f"{bos}{shots}{prompt}\n", response, self.tok.eos_token or ""
        if self._fast:
            return self._pre + prompt + self._mid, response, self._post
        head, full = self._render(prompt, None), self._render(prompt, response)
        if not full.startswith(head):
            raise ValueError("chat template renders the prompt differently with a response")
        rest = full[len(head):]
        cut = rest.rfind(response) + len(response) if response in rest else len(rest)
        return head, rest[:cut], rest[cut:]

    def _render(self, prompt: str, response: str | None) -> str:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for s in self.shots:
            msgs += [{"role": "user", "content": s.prompt},
                     {"role": "assistant", "content": s.response}]
        msgs.append({"role": "user", "content": prompt})
        if response is None:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        msgs.append({"role": "assistant", "content": response})
        return self.tok.apply_chat_template(msgs, tokenize=False)

    def check(self, prompt: str, response: str) -> bool:
        """True when the fast placeholder path renders exactly like the template."""
        if not self.chat:
            return True
        p, r, s = self.render(prompt, response)
        return p + r + s == self._render(prompt, response) and p == self._render(prompt, None)


def encode(examples: Sequence[Example], tokenizer, max_len: int = 512, *,
           responses: Sequence[str] | None = None, shots: Sequence[Example] = (),
           system: str | None = None) -> Encoded:
    """Tokenize examples (or the examples' prompts with other `responses`, for choices)."""
    prompts = [e.prompt for e in examples]
    resp = [e.response for e in examples] if responses is None else list(responses)
    return encode_pairs(prompts, resp, tokenizer, max_len, shots=shots, system=system)


def encode_pairs(prompts: Sequence[str], responses: Sequence[str], tokenizer,
                 max_len: int = 512, *, shots: Sequence[Example] = (),
                 system: str | None = None, chunk: int = 4096) -> Encoded:
    """Tokenize prompt/response pairs; over-long sequences lose the start of the prompt
    first (keeping the question's end and the answer), then the end of the response."""
    fmt = Formatter(tokenizer, shots, system)
    if prompts and fmt.chat and fmt._fast and not fmt.check(prompts[0], responses[0]):
        fmt._fast = False
    ids: list[np.ndarray] = []
    n_prompt = np.zeros(len(prompts), dtype=np.int64)
    n_suffix = np.zeros(len(prompts), dtype=np.int64)
    enc = Encoded(ids, n_prompt, n_suffix)
    for start in range(0, len(prompts), chunk):
        texts = [fmt.render(p, r) for p, r in zip(prompts[start:start + chunk],
                                                 responses[start:start + chunk], strict=True)]
        p_ids, r_ids, s_ids = (tokenizer([t[k] for t in texts], add_special_tokens=False)
                               ["input_ids"] for k in range(3))
        for j, (p, r, s) in enumerate(zip(p_ids, r_ids, s_ids, strict=True)):
            i = start + j
            p2, rs, cut = _truncate(p, r + s, max_len)
            n_suffix[i] = max(0, len(rs) - len(r))
            if cut:
                enc.truncated += 1
                enc.tokens_cut += cut
            if len(rs) == n_suffix[i]:
                enc.empty.append(i)
            ids.append(np.asarray(p2 + rs, dtype=np.int32))
            n_prompt[i] = len(p2)
    return enc


def _truncate(p: list[int], r: list[int], max_len: int) -> tuple[list[int], list[int], int]:
    over = len(p) + len(r) - max_len
    if over <= 0:
        return p, r, 0
    keep_p = max(max_len - len(r), max_len // 2, 0)
    keep_p = min(keep_p, len(p))
    p2 = p[len(p) - keep_p:]
    r2 = r[: max_len - len(p2)]
    return p2, r2, len(p) + len(r) - len(p2) - len(r2)


def length_batches(lengths: np.ndarray, max_tokens: int, max_batch: int = 64,
                   seed: int | None = None, max_pad: float = 0.1) -> list[np.ndarray]:
    """Group indices into batches of similar length with batch·max_len ≤ max_tokens.

    Rows are taken longest first, and a batch closes when the next row is more than
    `max_pad` shorter than its longest, so padding stays under that fraction. With a seed the
    batch order (not the grouping) is shuffled, so training does not see lengths in order.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch, max_tokens // longest))
        end = start + 1
        floor = (1 - max_pad) * longest
        while end < min(start + size, len(order)) and lengths[order[end]] >= floor:
            end += 1
        batches.append(order[start:end])
        start = end
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def token_batches(lengths: np.ndarray, max_tokens: int, max_rows: int = 512
                  ) -> list[np.ndarray]:
    """Rows longest first, as many per batch as fit in `max_tokens` real tokens (at least
    one): for a forward that runs real tokens only (`decoder.states`), where padding costs
    nothing outside attention, which groups similar lengths itself."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end, total = start + 1, int(lengths[order[start]])
        while end < len(order) and end - start < max_rows:
            total += int(lengths[order[end]])
            if total > max_tokens:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def ordered_batches(lengths: np.ndarray, max_tokens: int, max_batch: int = 64
                    ) -> list[np.ndarray]:
    """Consecutive rows, in the given order, with batch·max_len ≤ max_tokens: for a
    curriculum, where the order is the point and padding is the price."""
    batches: list[np.ndarray] = []
    start = 0
    while start < len(lengths):
        end, longest = start + 1, max(int(lengths[start]), 1)
        while end < len(lengths) and end - start < max_batch:
            longest2 = max(longest, int(lengths[end]))
            if longest2 * (end - start + 1) > max_tokens:
                break
            longest, end = longest2, end + 1
        batches.append(np.arange(start, end))
        start = end
    return batches


@dataclass
class Batch:
    """A left-padded batch: every row ends at the last column. The per-row counts are kept
    on the host too, so the passes size and index the batch without reading the device
    (each read would stall a GPU's queue)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    n_response: torch.Tensor  # [B] response tokens per row (they are the last ones)
    n_suffix: torch.Tensor  # [B] of which the final end-of-turn tokens
    index: np.ndarray  # rows of the Encoded this batch came from
    lengths: np.ndarray  # [B] real tokens per row: host copies of the counts
    response: np.ndarray  # [B] n_response
    suffix: np.ndarray  # [B] n_suffix

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    def scored(self, suffix: bool) -> tuple[int, np.ndarray]:
        """(k, flat positions in [B, k]) of the scored response tokens, row-major — what
        `mask.nonzero()` would give, computed on the host."""
        k = int(self.response.max())
        cols = np.arange(k)
        mask = cols[None, :] >= (k - self.response)[:, None]
        if not suffix:
            mask &= cols[None, :] < (k - self.suffix)[:, None]
        return k, np.flatnonzero(mask)

    def to(self, device: torch.device) -> Batch:
        """On the device with one asynchronous copy per dtype group (pinned host memory on
        CUDA: a copy from pageable memory waits for the device's queue)."""
        if _same_device(self.input_ids.device, torch.device(device)):
            return self
        grid = to_device(torch.stack([self.input_ids, self.attention_mask,
                                      self.position_ids]), device)
        counts = to_device(torch.stack([self.n_response, self.n_suffix]), device)
        return Batch(grid[0], grid[1], grid[2], counts[0], counts[1], self.index,
                     self.lengths, self.response, self.suffix)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` names the current device: it matches `cuda:0` when that is the current one."""
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else current) == \
        (b.index if b.index is not None else current)


def to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: pinned, then copied asynchronously
    (the caching host allocator keeps the pinned block until the copy is done)."""
    t = torch.as_tensor(t)
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collate(enc: Encoded, index: np.ndarray, pad_id: int) -> Batch:
    rows = [enc.ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    index = np.asarray(index)
    n_resp = np.array([len(enc.ids[i]) - enc.n_prompt[i] for i in index], dtype=np.int64)
    suffix = enc.n_suffix[index].copy()
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos),
                 torch.from_numpy(n_resp), torch.from_numpy(suffix), index,
                 mask.sum(1), n_resp, suffix)
