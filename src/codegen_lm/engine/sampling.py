"""Sampling: greedy, temperature, top-k and top-p (nucleus), one token per row from fp32 logits, each row from its
own uniform draw, so that a row gets the same token whatever else is in the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM): softmax(logits / T) is one-hot up to rounding


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature`` 0 (or anything below ``GREEDY_TEMPERATURE``) means greedy; a
    ``top_p`` below the most probable token's probability keeps only that token."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.n >= 1, f"n must be at least 1 (got {self.n})"),
            (0 <= self.temperature < math.inf, f"temperature must be a finite number >= 0, 0 for greedy (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 for no limit (got {self.top_k})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def draw_uniforms(params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One uniform draw ``[b]`` per sampled row from its own generator (0 for greedy rows, which draw nothing).
    Drawn before any sampling arithmetic, so that a row can be sampled again, alone, with the same draw."""
    return torch.stack([torch.zeros(()) if p.greedy else torch.rand((), generator=g) for p, g in zip(params, generators)])


def sample(logits: torch.Tensor, params: list[SamplingParams], draws: torch.Tensor) -> torch.Tensor:
    """One token per row of fp32 ``logits`` ``[b, vocab]``: argmax for greedy rows; else inverse-CDF sampling (in
    vocabulary order) of ``kept_probs`` at the row's uniform draw (``draw_uniforms``). Nothing here sorts the
    vocabulary: a full sort of 50k probabilities per row and step costs more than the rest of sampling together.
    Rows are independent: a row gets the same token whatever else is in the batch."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    tokens = logits.argmax(dim=-1) if len(rows) < len(params) else logits.new_zeros(len(params), dtype=torch.long)
    if rows:
        tokens[rows] = pick(kept_probs(logits[rows], [params[i] for i in rows]), draws[rows])
    return tokens


def kept_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """What sampling draws from, unnormalized, ``[b, vocab]``: softmax(logits / T) with the tokens outside the top-k
    and outside the top-p nucleus set to 0 (the rows' params must not be greedy)."""
    device, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)[:, None]
    probs = (logits / temps).softmax(dim=-1)
    floor = torch.zeros(len(params), dtype=probs.dtype, device=device)  # keep the tokens with p >= floor
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        ranked = probs.topk(max(top_k), dim=-1).values  # ties with the k-th token are kept, as in transformers
        kth = ranked.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None]).squeeze(1)
        floor = torch.where(torch.tensor(top_k, device=device) > 0, kth, floor)
    top_p = [p.top_p for p in params]
    if min(top_p) < 1:
        nucleus = nucleus_floor(probs, torch.tensor(top_p, dtype=probs.dtype, device=device))
        floor = torch.maximum(floor, nucleus)
    return torch.where(probs >= floor[:, None], probs, 0)


def pick(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row of unnormalized ``probs`` ``[b, vocab]``, the token where the cumulative
    mass first exceeds the row's draw ``[b]`` (in [0, 1)) times the total."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, draws.to(device=cdf.device, dtype=cdf.dtype)[:, None] * total, right=True)
    # A draw that rounds up to the total would land past the last kept token (on a padding row, say): stop there.
    last_kept = torch.searchsorted(cdf, total)
    return torch.minimum(picked, last_kept).squeeze(1)


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """The least probability in each row's top-p nucleus ``[r]`` (0 where top_p is 1).

    A token is in the nucleus when the tokens strictly more probable than it hold less than top_p of the mass:
    the smallest set of most probable tokens that reaches top_p, plus any tied with its least probable one.
    The top ``candidates`` tokens settle peaked rows; flat rows (high temperature, random weights) are settled by
    a histogram of the probabilities' bit patterns (no full sort either way)."""
    rows = probs.shape[0]
    floor = torch.zeros(rows, dtype=probs.dtype, device=probs.device)
    ranked = probs.topk(min(candidates, probs.shape[-1]), dim=-1).values
    # The most probable token is always kept, even where top_p is below float precision (5e-324 becomes 0 in fp32).
    kept = ((ranked.cumsum(dim=-1) - ranked) < top_p[:, None]).sum(dim=-1).clamp_(min=1)
    settled = kept < ranked.shape[-1]
    floor = torch.where(settled, ranked.gather(1, (kept - 1)[:, None]).squeeze(1), floor)
    flat = (~settled & (top_p < 1)).nonzero().squeeze(1).tolist()
    if flat:
        floor[flat] = _histogram_floor(probs[flat], top_p[flat])
    return torch.where(top_p < 1, floor, 0)


def _histogram_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # Positive floats order like their int32 bit patterns, so the top 16 bits put each probability in one of 2^15
    # ordered bins. One pass sums the mass per bin; the nucleus ends in the bin where the mass of the bins above
    # it first falls below top_p (every bin above is kept whole, every bin below dropped), and only that bin's
    # few tokens are sorted to find the exact floor.
    rows = probs.shape[0]
    keys = (probs.view(torch.int32) >> 16).long()
    mass = torch.zeros(rows, 1 << 15, dtype=probs.dtype, device=probs.device).scatter_add_(1, keys, probs)
    above = mass.flip(-1).cumsum(dim=-1).flip(-1) - mass  # mass of the bins above each bin
    boundary = ((above < top_p[:, None]) & (mass > 0)).int().argmax(dim=-1)  # the lowest such bin
    floors = []
    for row in range(rows):
        members = probs[row][keys[row] == boundary[row]].sort(descending=True).values
        kept = int(((members.cumsum(dim=0) - members + above[row, boundary[row]]) < top_p[row]).sum())
        floors.append(members[max(kept, 1) - 1])
    return torch.stack(floors)
