"""Sampler: logits [B, V] (float32, or the model's 16-bit logits) -> one token per row, plus logprobs when asked.

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
  5. greedy rows (temperature 0 or top_k 1): argmax. Others: p = softmax(logits / T), then min_p (drop
     p < min_p * p_max), top_k (the k largest), top_p (keep a token while the mass ranked above it is < top_p
     of the mass left), then an exponential race: argmax(p / q), q ~ Exp(1) drawn per candidate.
Rows with top_k work on their k candidates only (one torch.topk over V; no softmax, sort or noise over V);
rows without top_k use all V tokens (a full sort only when they use top_p).
Seeds: a row with a generator draws its q from that generator alone (k or V values), so a seed gives the same
tokens whatever the batch mates; rows without one share the sampler's generator (torch's default when None).
For n > 1 the engine should seed completion i with seed + i.
Host syncs: one per call (the sampled ids and logprobs come back together), in PendingSample.result() for
`sample_async`, which lets the caller queue more work before waiting; host lists reach the
device through `to_device` (no wait for queued kernels), and no step sizes a tensor by its data (no boolean-mask
indexing or unique), except for ids past the logits' width, which the engine never produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qnext.engine.host_device import HostCopy, to_device, to_host
from qnext.ops.registry import get_op
from qnext.sampling_params import Logprob, SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class _DeviceIds:
    """An append-only int64 id list mirrored on a device; only new ids are copied."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(64, dtype=torch.int64, device=device)
        self.n = 0

    def extend(self, ids: list[int]) -> None:
        if not ids:
            return
        need = self.n + len(ids)
        if need > self.buf.numel():
            grown = torch.empty(2 * need, dtype=torch.int64, device=self.buf.device)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = to_device(ids, torch.int64, self.buf.device)
        self.n = need

    def tensor(self) -> torch.Tensor:
        return self.buf[: self.n]


@dataclass(eq=False)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = field(default_factory=list)  # live, append-only (shrinking resets caches)
    generator: torch.Generator | None = None  # on the logits' device
    banned_token_ids: Sequence[int] = ()  # masked to -inf for this step
    # penalty caches, built lazily on the logits' device
    _out: _DeviceIds | None = field(default=None, init=False, repr=False)  # output ids, with repeats
    _seen: _DeviceIds | None = field(default=None, init=False, repr=False)  # unique ids of prompt + output
    _seen_set: set[int] = field(default_factory=set, init=False, repr=False)
    _synced: int = field(default=0, init=False, repr=False)  # output ids folded into the caches
    max_seen_id: int = field(default=-1, init=False, repr=False)  # largest id of prompt + output (host-side)

    def _sync(self, device: torch.device) -> None:
        n = len(self.output_token_ids)
        if self._out is None or self._out.buf.device != device or n < self._synced:
            self._out, self._seen, self._synced = _DeviceIds(device), _DeviceIds(device), 0
            self._seen_set = set(self.prompt_token_ids)
            self._seen.extend(sorted(self._seen_set))
            self.max_seen_id = max(self._seen_set, default=-1)
        if n > self._synced:
            new = list(self.output_token_ids[self._synced : n])
            self._out.extend(new)
            fresh = [t for t in dict.fromkeys(new) if t not in self._seen_set]
            self._seen_set.update(fresh)
            self._seen.extend(fresh)
            self.max_seen_id = max(self.max_seen_id, *fresh) if fresh else self.max_seen_id
            self._synced = n

    def output_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """[len(output_token_ids)] int64."""
        self._sync(device)
        return self._out.tensor()

    def seen_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """[U] int64: the distinct ids of prompt + output."""
        self._sync(device)
        return self._seen.tensor()


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B]
    sampled: torch.Tensor  # [B] int64 on the logits' device
    logprobs: list[dict[int, Logprob] | None]  # [B]; decoded_token is left None for the caller to fill


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0 or p.presence_penalty != 0


def _top_k(p: SamplingParams, vocab: int) -> int:
    return p.top_k if 0 < p.top_k < vocab else 0


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # for rows without their own; None = torch's default RNG

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        return self.sample_async(logits, rows).result()

    @torch.no_grad()
    def sample_async(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> "PendingSample":
        """Queue the sampling and the copy of its results to the host; PendingSample.result() waits for them."""
        B, V = logits.shape
        if B != len(rows):
            raise ValueError(f"logits has {B} rows but {len(rows)} SamplingRows were given")
        edits = any(r.params.logits_processors or r.banned_token_ids or _has_penalty(r.params) for r in rows)
        # Greedy rows alone, unedited and without logprobs, take the logits as they come (bf16 from the model, no
        # float32 copy): float32 holds every bf16 value exactly and in order, so the argmax is the same.
        as_they_come = not edits and all(r.params.greedy and r.params.logprobs is None for r in rows)
        x = logits if as_they_come else logits.float()  # [B, V]
        if edits:
            x = x.clone(memory_format=torch.contiguous_format)  # edited in place below
            apply_processors(x, rows)
            apply_penalties(x, rows)

        sampled = torch.empty(B, dtype=torch.int64, device=x.device)
        groups = {"greedy": [], "top_k": [], "full": []}
        for i, r in enumerate(rows):
            kind = "greedy" if r.params.greedy else "top_k" if _top_k(r.params, V) else "full"
            groups[kind].append(i)
        for kind, idx in groups.items():
            if not idx:
                continue
            rows_t = None if len(idx) == B else to_device(idx, torch.int64, x.device)
            sub = x if rows_t is None else x[rows_t]
            if kind == "greedy":
                tok = get_op("greedy_argmax", "auto", x.device)(sub)
            else:
                params = [rows[i].params for i in idx]
                probs, order = candidate_probs(sub, params)
                tok = self._race(probs, [rows[i] for i in idx], [_top_k(p, V) or V for p in params])
                tok = tok if order is None else order.gather(1, tok.unsqueeze(1)).squeeze(1)
            if rows_t is None:
                sampled = tok
            else:
                sampled[rows_t] = tok
        lp = logprob_tensors(x, sampled, rows)
        return PendingSample(sampled, lp, HostCopy((sampled, *lp.tensors)))

    def _race(self, probs: torch.Tensor, rows: Sequence[SamplingRow], widths: Sequence[int]) -> torch.Tensor:
        """probs [R, W] candidate weights (0 = excluded) -> [R] int64 column of the winner: argmax p / q.

        A seeded row draws exactly widths[j] values (its own k, or V) from its generator, whatever W is.
        """
        q = torch.empty_like(probs)
        if any(r.generator is None for r in rows):
            q.exponential_(generator=self.generator)
        for j, r in enumerate(rows):
            if r.generator is not None:
                q[j, : widths[j]].exponential_(generator=r.generator)
                q[j, widths[j] :] = 1.0
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


@dataclass
class PendingSample:
    sampled: torch.Tensor    # [B] int64 on the logits' device: a next step can read it before the host does
    logprobs: "LogprobTensors"
    copy: HostCopy

    def result(self) -> SamplerOutput:
        """Waits for this sample's copy (one wait for ids and logprobs together)."""
        token_ids, *lp_lists = self.copy.wait()
        return SamplerOutput(token_ids, self.sampled, self.logprobs.dicts(lp_lists))


# ---- steps 1-3: processed logits ---------------------------------------------------------------
def apply_processors(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        for proc in r.params.logits_processors:
            x[i] = proc(r.output_token_ids, x[i])
        if r.banned_token_ids:
            x[i, to_device(list(r.banned_token_ids), torch.int64, x.device)] = float("-inf")


def apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place on contiguous x [B, V]; touches only the ids each row has seen (gather/scatter on the flat view)."""
    V, dev, flat_x = x.shape[1], x.device, x.view(-1)
    rep = [(i, r) for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = [r.seen_ids_tensor(dev) for _, r in rep]
        # ids past the logits' width would land in the next row (a data-dependent size: a host sync, never taken
        # by the engine, whose ids are all < vocab_size)
        seen = [t if r.max_seen_id < V else t[t < V] for t, (_, r) in zip(seen, rep)]
        flat = torch.cat([t + i * V for t, (i, _) in zip(seen, rep)])  # distinct within a row, rows disjoint
        pen = torch.cat([torch.full(t.shape, r.params.repetition_penalty, device=dev) for t, (_, r) in zip(seen, rep)])
        v = flat_x[flat]
        flat_x[flat] = torch.where(v > 0, v / pen, v * pen)
    cnt = [(i, r) for i, r in enumerate(rows) if r.params.frequency_penalty != 0 or r.params.presence_penalty != 0]
    for i, r in cnt:
        out = r.output_ids_tensor(dev)
        if r.max_seen_id >= V:
            out = out[out < V]
        if out.numel() == 0:
            continue
        row = x[i]
        if r.params.frequency_penalty != 0:
            row.index_add_(0, out, torch.full(out.shape, -r.params.frequency_penalty, device=dev))  # once per occurrence
        if r.params.presence_penalty != 0:
            # once per distinct id: repeated ids gather the same value and write back the same result
            row[out] -= r.params.presence_penalty


# ---- step 5: candidates ------------------------------------------------------------------------
def candidate_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Processed logits x [R, V] of non-greedy rows -> (probs [R, W], order [R, W] | None).

    probs are the truncated, renormalised sampling weights over W candidates; order maps a candidate column to
    its token id (None: the columns are the token ids, W = V). Either every row has top_k (W = max k, sorted
    descending) or none has (W = V).
    """
    dev, V = x.device, x.shape[1]
    temp = to_device([p.temperature for p in params], torch.float32, dev).unsqueeze(1)
    ks = [_top_k(p, V) for p in params]
    if all(ks):
        cand, order = x.topk(max(ks), dim=-1)  # [R, kmax] largest logits, descending
        in_k = torch.arange(cand.shape[1], device=dev).unsqueeze(0) < to_device(ks, torch.int64, dev).unsqueeze(1)
        probs = torch.softmax(torch.where(in_k, cand / temp, float("-inf")), dim=-1)
        return _renorm(probs * _truncate_sorted(probs, params)), order
    if any(ks):
        raise ValueError("candidate_probs: rows must all use top_k or none")
    probs = torch.softmax(x / temp, dim=-1)  # [R, V]
    if any(p.top_p < 1 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, _truncate_sorted(sorted_p, params))
    elif any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, dev).unsqueeze(1)
        keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    else:
        return probs, None
    return _renorm(probs * keep), None


def _truncate_sorted(sorted_p: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """sorted_p [R, W] probabilities, descending -> keep [R, W] bool after min_p then top_p."""
    dev = sorted_p.device
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, dev).unsqueeze(1)
        keep = sorted_p >= min_p * sorted_p[:, :1]
    if any(p.top_p < 1 for p in params):
        top_p = to_device([p.top_p for p in params], torch.float32, dev).unsqueeze(1)
        kept_p = sorted_p * keep
        above = kept_p.cumsum(dim=-1) - kept_p  # mass ranked strictly above each position
        keep &= (above < top_p * kept_p.sum(dim=-1, keepdim=True)) | (top_p >= 1)
    return keep


def _renorm(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True)


def truncated_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The sampling distribution over all V tokens, [R, V]; rows are grouped as the sampler groups them."""
    R, V = logits.shape
    out = torch.zeros(R, V, dtype=torch.float32, device=logits.device)
    for use_k in (True, False):
        idx = [i for i, p in enumerate(params) if bool(_top_k(p, V)) == use_k]
        if idx:
            probs, order = candidate_probs(logits[idx].float(), [params[i] for i in idx])
            out[idx] = probs if order is None else torch.zeros(len(idx), V, device=logits.device).scatter_(1, order, probs)
    return out


# ---- step 4: logprobs ---------------------------------------------------------------------------
class LogprobTensors:
    """Logprob results still on the device (`tensors`), turned into dicts once brought to the host (`dicts`)."""

    def __init__(self, num_rows: int, want: list[int], ns: list[int], tensors: tuple[torch.Tensor, ...] = ()):
        self.num_rows, self.want, self.ns, self.tensors = num_rows, want, ns, tensors

    def dicts(self, host: Sequence[list]) -> list[dict[int, Logprob] | None]:
        out: list[dict[int, Logprob] | None] = [None] * self.num_rows
        if self.want:
            for i, d in zip(self.want, logprob_dicts(*host, self.ns)):
                out[i] = d
        return out


def topn_logprobs(lp: torch.Tensor, tok: torch.Tensor, n_top: int) -> tuple[torch.Tensor, ...]:
    """lp [R, V] log-probabilities, tok [R] int64 -> (tok [R], tok_lp [R], rank [R], top_lp [R, n], top_ids [R, n]),
    rank = 1 + #tokens with a larger logprob."""
    tok_lp = lp.gather(1, tok.unsqueeze(1))  # [R, 1]
    rank = (lp > tok_lp).sum(dim=1) + 1
    if n_top > 0:
        top_lp, top_ids = lp.topk(n_top, dim=-1)
    else:
        top_lp, top_ids = lp[:, :0], tok.unsqueeze(1)[:, :0]
    return tok, tok_lp.squeeze(1), rank, top_lp, top_ids


def logprob_dicts(tok: list, tok_lp: list, rank: list, top_lp: list, top_ids: list,
                  ns: Sequence[int]) -> list[dict[int, Logprob]]:
    """Host lists of topn_logprobs -> per row {token: Logprob} with the token first, then its top ns[j]."""
    out = []
    for j, n in enumerate(ns):
        d = {tok[j]: Logprob(tok_lp[j], rank[j])}
        for r, (t, v) in enumerate(zip(top_ids[j][:n], top_lp[j][:n]), start=1):
            d.setdefault(t, Logprob(v, r))
        out.append(d)
    return out


def logprob_tensors(x: torch.Tensor, sampled: torch.Tensor, rows: Sequence[SamplingRow]) -> LogprobTensors:
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    ns = [rows[i].params.logprobs for i in want]
    if not want:
        return LogprobTensors(len(rows), want, ns)
    if len(want) == len(rows):
        lp, tok = torch.log_softmax(x, dim=-1), sampled  # [W, V]
    else:
        wi = to_device(want, torch.int64, x.device)
        lp, tok = torch.log_softmax(x[wi], dim=-1), sampled[wi]
    return LogprobTensors(len(rows), want, ns, topn_logprobs(lp, tok, max(ns)))


def compute_logprobs(x: torch.Tensor, sampled: torch.Tensor, rows: Sequence[SamplingRow]) -> list[dict[int, Logprob] | None]:
    lp = logprob_tensors(x, sampled, rows)
    return lp.dicts(to_host(*lp.tensors))
