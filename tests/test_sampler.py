"""Sampler: greedy, seeds independent of batch mates, exact truncation masks, penalties, processors, logprobs."""

import pytest
import torch

from qnext.engine.sampler import Sampler, SamplingRow, make_generator, truncated_probs
from qnext.sampling_params import SamplingParams

V = 64


def row(prompt=(), output=None, **kw):
    p = SamplingParams(**kw)
    return SamplingRow(p, list(prompt), [] if output is None else output, generator=make_generator(p.seed))


def logits(b, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(3)
    out = Sampler().sample(x, [row(temperature=0.0), row(top_k=1), row(temperature=0.0, top_p=0.5)])
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.sampled.dtype == torch.int64 and out.logprobs == [None] * 3


def run_seeded(seed, mates_before, mates_after, steps=20, **target_kw):
    """Sample `steps` tokens for one seeded row placed between other rows; return its tokens."""
    sampler = Sampler()
    target = row(seed=seed, **target_kw)
    mates_b = [row(seed=100 + i, top_k=5 + 7 * i) for i in range(mates_before)]
    mates_a = [row(temperature=1.5, top_k=0 if i % 2 else 50) for i in range(mates_after)]
    rows = mates_b + [target] + mates_a
    for step in range(steps):
        x = logits(len(rows), seed=step + 1000 * len(rows))
        x[mates_before] = logits(1, seed=step)[0]  # the target's logits depend only on the step
        out = sampler.sample(x, rows)
        for r, t in zip(rows, out.token_ids):
            r.output_token_ids.append(t)
    return target.output_token_ids


@pytest.mark.parametrize("target_kw", [
    {"temperature": 0.8, "top_p": 0.9}, {"top_k": 20, "min_p": 0.01}, {"repetition_penalty": 1.3, "top_k": 3},
])
def test_seed_reproducible_regardless_of_batch_mates(target_kw):
    alone = run_seeded(7, 0, 0, **target_kw)
    assert run_seeded(7, 2, 3, **target_kw) == alone
    assert run_seeded(7, 5, 0, **target_kw) == alone
    assert run_seeded(8, 0, 0, **target_kw) != alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    x = probs.log().expand(n, 4).clone()
    g = torch.Generator().manual_seed(0)
    toks = torch.tensor(Sampler(g).sample(x, [row(temperature=1.0)] * n).token_ids)
    freq = torch.bincount(toks, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    # temperature 2 flattens: p^(1/2) renormalised
    toks = torch.tensor(Sampler(g).sample(x, [row(temperature=2.0)] * n).token_ids)
    want = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(torch.bincount(toks, minlength=4).float() / n, want, atol=0.015)
    # top_k path: renormalised over the top 3
    toks = torch.tensor(Sampler(g).sample(x, [row(top_k=3)] * n).token_ids)
    want = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(torch.bincount(toks, minlength=4).float() / n, want, atol=0.015)


PROBS = torch.tensor([0.02, 0.30, 0.05, 0.25, 0.001, 0.20, 0.15, 0.029])  # sums to 1, no ties


def dist(**kw):
    return truncated_probs(PROBS.log()[None], [SamplingParams(**kw)])[0]


def kept(**kw):
    return set(torch.nonzero(dist(**kw)).flatten().tolist())


@pytest.mark.parametrize("kw, want", [
    ({}, set(range(8))),
    ({"top_k": 3}, {1, 3, 5}),
    ({"top_k": -1}, set(range(8))),
    ({"top_k": 100}, set(range(8))),
    ({"top_p": 0.5}, {1, 3}),  # 0.30 + 0.25 >= 0.5: the third token's mass above is 0.55
    ({"top_p": 0.56}, {1, 3, 5}),
    ({"top_p": 0.01}, {1}),  # always at least one token
    ({"min_p": 0.49}, {1, 3, 5, 6}),  # p >= 0.147
    ({"min_p": 0.51}, {1, 3, 5}),
    ({"min_p": 0.7}, {1, 3}),
    ({"top_k": 4, "top_p": 0.8}, {1, 3, 5}),  # top_p over the renormalised top 4: 0.30+0.25 = 0.55 < 0.8*0.9
    ({"min_p": 0.1, "top_k": 5, "top_p": 0.9}, {1, 3, 5, 6}),
    ({"min_p": 0.1, "top_p": 0.9}, {1, 3, 5, 6}),
    ({"top_k": 6, "temperature": 0.5}, {1, 3, 5, 6, 2, 7}),
])
def test_truncation_masks_exact(kw, want):
    assert kept(**kw) == want


def test_truncated_distribution_is_renormalised():
    d = dist(top_k=3)
    assert torch.allclose(d[[1, 3, 5]], torch.tensor([0.30, 0.25, 0.20]) / 0.75)
    assert torch.allclose(dist(top_k=7, top_p=0.56), dist(top_p=0.56))  # the top_k path and the full path agree
    t = PROBS ** 2 / (PROBS ** 2).sum()  # temperature 0.5 squares the probabilities
    assert torch.allclose(dist(temperature=0.5, min_p=0.3), torch.where(t >= 0.3 * t.max(), t, 0) / t[t >= 0.3 * t.max()].sum())


def test_truncation_rows_use_their_own_settings():
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.56), SamplingParams(min_p=0.7), SamplingParams()]
    out = truncated_probs(PROBS.log().expand(4, 8), params)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in out] == [{1, 3}, {1, 3, 5}, {1, 3}, set(range(8))]
    toks = Sampler(torch.Generator().manual_seed(1)).sample(
        PROBS.log().expand(3000, 8).clone(), [row(top_k=3), row(top_p=0.56)] * 1500).token_ids
    assert set(toks) == {1, 3, 5}


def processed_logprobs(x, r):
    """Logprobs of all V tokens as the sampler sees them (V <= 20 so logprobs=V lists every token)."""
    r.params.logprobs = x.shape[0]
    d = Sampler().sample(x[None], [r]).logprobs[0]
    return torch.tensor([d[t].logprob for t in range(x.shape[0])])


def test_repetition_penalty_prompt_and_output():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    got = processed_logprobs(x, row(prompt=[0, 1], output=[2, 3, 3], repetition_penalty=2.0, temperature=0.0))
    want = torch.log_softmax(torch.tensor([1.0, -4.0, 0.5, -2.0, 0.5, 3.0]), -1)
    assert torch.allclose(got, want, atol=1e-6)


def test_frequency_presence_penalties_over_output_only():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    r = row(prompt=[4, 4], output=[0, 0, 0, 2], frequency_penalty=0.5, presence_penalty=0.25, temperature=0.0)
    want = torch.log_softmax(torch.tensor([2.0 - 1.5 - 0.25, -2.0, 1.0 - 0.5 - 0.25, -1.0, 0.5, 3.0]), -1)
    assert torch.allclose(processed_logprobs(x, r), want, atol=1e-6)
    r.output_token_ids.append(5)  # the cached output tensor picks up appended ids
    want = torch.log_softmax(torch.tensor([0.25, -2.0, 0.25, -1.0, 0.5, 3.0 - 0.5 - 0.25]), -1)
    assert torch.allclose(processed_logprobs(x, r), want, atol=1e-6)


def test_processors_and_banned_ids():
    seen = []

    def only_seven(out_ids, lg):
        seen.append(list(out_ids))
        mask = torch.full_like(lg, float("-inf"))
        mask[7] = 0
        return lg + mask

    x = logits(3)
    r0 = row(output=[1, 2], logits_processors=[only_seven], seed=3)
    r1 = row(temperature=0.0)
    r1.banned_token_ids = [int(x[1].argmax())]
    r2 = row(temperature=0.0, logprobs=2)
    r2.banned_token_ids = [int(x[2].argmax())]
    out = Sampler().sample(x, [r0, r1, r2])
    assert out.token_ids[0] == 7 and seen == [[1, 2]]
    assert out.token_ids[1] == int(x[1].topk(2).indices[1])
    banned, second = x[2].topk(2).indices.tolist()
    assert out.token_ids[2] == second and out.logprobs[2][second].rank == 1  # ranks over the processed logits
    assert banned not in out.logprobs[2]


def test_logprobs_and_ranks():
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    lp = torch.log_softmax(x[0], -1)
    d = Sampler().sample(x, [row(temperature=0.0, logprobs=2)]).logprobs[0]
    assert {t: (v.rank, round(v.logprob, 5)) for t, v in d.items()} == {1: (1, round(lp[1].item(), 5)), 3: (2, round(lp[3].item(), 5))}
    # logprobs are un-tempered; a sampled token outside the top N comes with its rank
    ban_top = lambda _, lg: torch.where(lg >= 2.0, float("-inf"), lg)  # noqa: E731
    d = Sampler().sample(x, [row(temperature=0.0, logprobs=1, logits_processors=[ban_top])]).logprobs[0]
    lp2 = torch.log_softmax(torch.tensor([0.0, 1.0, -1.0]), -1)
    assert list(d) == [2] and d[2].rank == 1 and abs(d[2].logprob - lp2[1].item()) < 1e-6
    d = Sampler().sample(x, [row(temperature=5.0, logprobs=0, seed=1, top_k=2, min_p=0.0)]).logprobs[0]
    (tok, v), = d.items()
    assert tok in (1, 3) and v.rank == (1 if tok == 1 else 2) and abs(v.logprob - lp[tok].item()) < 1e-6


def test_output_ids_cache_tracks_the_live_list():
    r = row(output=[1, 2, 3])
    assert r.output_ids_tensor(torch.device("cpu")).tolist() == [1, 2, 3]
    r.output_token_ids.extend(range(200))
    assert r.output_ids_tensor(torch.device("cpu")).tolist() == [1, 2, 3, *range(200)]
    del r.output_token_ids[5:]
    assert r.output_ids_tensor(torch.device("cpu")).tolist() == [1, 2, 3, 0, 1]


def test_rows_mismatch_is_an_error():
    with pytest.raises(ValueError):
        Sampler().sample(logits(2), [row()])


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.1}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "1"}, "seed"), ({"logits_processors": [3]}, "logits_processors"),
])
def test_params_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kw)


def test_params_defaults_and_generation_config(tmp_path):
    p = SamplingParams(stop="###")
    assert p.stop == ["###"] and not p.greedy and SamplingParams(top_k=1).greedy and SamplingParams(temperature=0).greedy
    gen = {"temperature": 1.0, "top_p": 0.95, "top_k": 40, "min_p": 0.01, "max_new_tokens": 512, "eos_token_id": [1, 2]}
    p = SamplingParams.from_generation_config(gen, max_tokens=64, temperature=None)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1.0, 0.95, 40, 0.01, 64)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "top_k": 20}')
    assert SamplingParams.from_generation_config(tmp_path).greedy
    assert SamplingParams.from_generation_config(None) == SamplingParams()
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_generation_config({}, temprature=1.0)
