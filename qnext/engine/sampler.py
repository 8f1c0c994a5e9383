"""Sampler: logits [B, V] float32 -> one token per row, plus logprobs when asked.

API (the engine keeps one SamplingRow per running sequence, made at admission, and passes the rows each step):

    row = SamplingRow(params, prompt_token_ids, output_token_ids=seq.output_ids,   # live list, append-only
                      generator=make_generator(params.seed, device))               # None when seed is None
    row.banned_token_ids = stop_checker.suppressed_token_ids()                     # before each step (min_tokens)
    out = sampler.sample(logits, rows)        # logits [B, V]; rows[i] describes logits[i]
    out.token_ids[i] -> int                   # out.sampled: the same, [B] int64 on the logits' device
    out.logprobs[i] -> dict[int, Logprob] | None   # sampled token + top-N; None when params.logprobs is None

Per row, in this order (vLLM's):
  1. params.logits_processors(output_token_ids, logits_row) -> logits_row
  2. banned_token_ids -> -inf
  3. repetition_penalty over prompt + output ids (positive logits / r, negative * r), then
     frequency_penalty * count and presence_penalty * (count > 0) subtracted, counts over output ids (OpenAI)
  4. logprobs = log_softmax of these processed logits, before temperature and truncation ("processed" mode:
     what the penalised model assigns; a banned token has -inf). rank = 1 + #tokens with a larger logprob.
  5. greedy rows (temperature 0 or top_k 1): argmax. Others: softmax(logits / T) -> min_p (drop p < min_p * p_max)
     -> top_k (keep p >= k-th largest, ties kept) -> top_p (keep a token while the mass ranked above it is
     < top_p of the remaining mass) -> exponential race: argmax(p / q), q ~ Exp(1).
Seeds: a row with a generator draws its q from that generator alone, so a seed gives the same tokens whatever
the batch mates; rows without one share the sampler's generator (torch's default when None). For n > 1 the
engine should seed completion i with seed + i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qnext.sampling_params import Logprob, SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass(eq=False)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = field(default_factory=list)  # live, append-only (shrinking resets caches)
    generator: torch.Generator | None = None  # on the logits' device
    banned_token_ids: Sequence[int] = ()  # masked to -inf for this step
    # device caches for penalties, built lazily
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)  # [P] unique int64
    _out_buf: torch.Tensor | None = field(default=None, init=False, repr=False)  # [capacity] int64
    _out_len: int = field(default=0, init=False, repr=False)

    def prompt_ids_tensor(self, device: torch.device) -> torch.Tensor:
        if self._prompt_ids is None or self._prompt_ids.device != device:
            t = torch.tensor(list(self.prompt_token_ids), dtype=torch.int64)
            self._prompt_ids = torch.unique(t).to(device)
        return self._prompt_ids

    def output_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """[len(output_token_ids)] int64 on device; only ids added since the last call are copied."""
        ids, n = self.output_token_ids, len(self.output_token_ids)
        buf = self._out_buf
        if buf is None or buf.device != device or n < self._out_len:
            buf, self._out_len = torch.empty(max(64, 2 * n), dtype=torch.int64, device=device), 0
        elif n > buf.numel():
            grown = torch.empty(2 * n, dtype=torch.int64, device=device)
            grown[: self._out_len] = buf[: self._out_len]
            buf = grown
        if n > self._out_len:
            buf[self._out_len : n] = torch.tensor(list(ids[self._out_len : n]), dtype=torch.int64).to(device)
            self._out_len = n
        self._out_buf = buf
        return buf[:n]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B]
    sampled: torch.Tensor  # [B] int64 on the logits' device
    logprobs: list[dict[int, Logprob] | None]  # [B]; decoded_token is left None for the caller to fill


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0 or p.presence_penalty != 0


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # for rows without their own; None = torch's default RNG

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        B, V = logits.shape
        if B != len(rows):
            raise ValueError(f"logits has {B} rows but {len(rows)} SamplingRows were given")
        edits = any(r.params.logits_processors or r.banned_token_ids or _has_penalty(r.params) for r in rows)
        x = logits.to(torch.float32, copy=edits)  # [B, V], processed in place below
        if edits:
            self._apply_processors(x, rows)
            self._apply_penalties(x, rows)

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == B:
            sampled = x.argmax(dim=-1)
        elif not greedy:
            sampled = self._sample_random(x, rows)
        else:
            sampled = torch.empty(B, dtype=torch.int64, device=x.device)
            rand = [i for i, r in enumerate(rows) if not r.params.greedy]
            gi, ri = torch.tensor(greedy, device=x.device), torch.tensor(rand, device=x.device)
            sampled[gi] = x[gi].argmax(dim=-1)
            sampled[ri] = self._sample_random(x[ri], [rows[i] for i in rand])

        token_ids = sampled.tolist()
        return SamplerOutput(token_ids, sampled, self._logprobs(x, sampled, rows))

    # ---- steps 1-3 --------------------------------------------------------------------------------
    @staticmethod
    def _apply_processors(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        for i, r in enumerate(rows):
            for proc in r.params.logits_processors:
                x[i] = proc(r.output_token_ids, x[i])
            if r.banned_token_ids:
                x[i, torch.tensor(list(r.banned_token_ids), dtype=torch.int64, device=x.device)] = float("-inf")

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        V, dev = x.shape[1], x.device
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        cnt = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0 or r.params.presence_penalty != 0]
        if rep:
            # seen [len(rep), V]: token occurs in prompt or output of that row
            flat = torch.cat(
                [torch.cat([rows[i].prompt_ids_tensor(dev), rows[i].output_ids_tensor(dev)]) + j * V for j, i in enumerate(rep)]
            )
            seen = torch.zeros(len(rep) * V, dtype=torch.bool, device=dev)
            seen[flat] = True
            seen = seen.view(len(rep), V)
            ri = torch.tensor(rep, device=dev)
            r = torch.tensor([rows[i].params.repetition_penalty for i in rep], device=dev).unsqueeze(1)
            xs = x[ri]
            x[ri] = torch.where(seen, torch.where(xs > 0, xs / r, xs * r), xs)
        if cnt:
            # counts [len(cnt), V]: occurrences of each token among the row's output ids
            flat = torch.cat([rows[i].output_ids_tensor(dev) + j * V for j, i in enumerate(cnt)])
            counts = torch.zeros(len(cnt) * V, dtype=torch.float32, device=dev)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
            counts = counts.view(len(cnt), V)
            ci = torch.tensor(cnt, device=dev)
            f = torch.tensor([rows[i].params.frequency_penalty for i in cnt], device=dev).unsqueeze(1)
            p = torch.tensor([rows[i].params.presence_penalty for i in cnt], device=dev).unsqueeze(1)
            x[ci] = x[ci] - f * counts - p * (counts > 0).float()

    # ---- step 5 -----------------------------------------------------------------------------------
    def _sample_random(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """x [R, V] processed logits of non-greedy rows -> [R] int64 token ids."""
        dev = x.device
        params = [r.params for r in rows]
        temp = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        probs = torch.softmax(x / temp, dim=-1)  # [R, V]
        probs = truncation_masks(probs, params)

        q = torch.empty_like(probs)
        if any(r.generator is None for r in rows):
            q.exponential_(generator=self.generator)
        for j, r in enumerate(rows):
            if r.generator is not None:
                q[j].exponential_(generator=r.generator)
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)

    # ---- step 4 -----------------------------------------------------------------------------------
    @staticmethod
    def _logprobs(x: torch.Tensor, sampled: torch.Tensor, rows: Sequence[SamplingRow]) -> list[dict[int, Logprob] | None]:
        out: list[dict[int, Logprob] | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return out
        wi = torch.tensor(want, device=x.device)
        lp = torch.log_softmax(x[wi], dim=-1)  # [W, V]
        tok = sampled[wi].unsqueeze(1)
        tok_lp = lp.gather(1, tok)  # [W, 1]
        tok_rank = (lp > tok_lp).sum(dim=1) + 1
        n_top = max(rows[i].params.logprobs for i in want)
        top_lp, top_ids = lp.topk(n_top, dim=-1) if n_top > 0 else (lp[:, :0], tok[:, :0])
        tok_l, tok_lp_l, rank_l = tok.squeeze(1).tolist(), tok_lp.squeeze(1).tolist(), tok_rank.tolist()
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            n = rows[i].params.logprobs
            d = {tok_l[j]: Logprob(tok_lp_l[j], rank_l[j])}
            for rank, (t, v) in enumerate(zip(top_ids_l[j][:n], top_lp_l[j][:n]), start=1):
                d.setdefault(t, Logprob(v, rank))
            out[i] = d
        return out


def truncation_masks(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """probs [R, V] (rows sum to 1) -> the same with tokens outside min_p / top_k / top_p set to 0 (not renormalised).

    Rows with top_k only look at their top max(k) tokens (torch.topk); a full sort is paid only by rows that
    use top_p without top_k. top_k keeps ties with the k-th value (within the top max(k) of the group).
    """
    dev, V = probs.device, probs.shape[1]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        probs = torch.where(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0, probs)
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    with_k = [i for i, k in enumerate(ks) if k > 0]
    sort_all = [i for i, (k, p) in enumerate(zip(ks, params)) if k == 0 and p.top_p < 1]
    if not with_k and not sort_all:
        return probs
    keep = torch.ones_like(probs, dtype=torch.bool)
    for idx in (with_k, sort_all):
        if idx:
            sub = probs[idx] if len(idx) < len(params) else probs
            keep_sub = _keep_top(sub, [ks[i] for i in idx], [params[i].top_p for i in idx])
            if len(idx) < len(params):
                keep[torch.tensor(idx, device=dev)] = keep_sub
            else:
                keep = keep_sub
    return torch.where(keep, probs, 0.0)


def _keep_top(probs: torch.Tensor, ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """probs [R, V] -> keep mask [R, V] bool for top_k (k > 0 for every row, or 0 for none) then top_p."""
    dev = probs.device
    if ks[0] > 0:
        sorted_p, order = probs.topk(max(ks), dim=-1)  # [R, kmax], descending
        kth = sorted_p.gather(1, torch.tensor(ks, device=dev).unsqueeze(1) - 1)  # [R, 1]
        keep_sorted = sorted_p >= kth
        sorted_p = torch.where(keep_sorted, sorted_p, 0.0)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [R, V]
        keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    top_p = torch.tensor(top_ps, device=dev).unsqueeze(1)
    above = sorted_p.cumsum(dim=-1) - sorted_p  # mass ranked strictly above each sorted position
    keep_sorted &= (above < top_p * sorted_p.sum(dim=-1, keepdim=True)) | (top_p >= 1)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)
