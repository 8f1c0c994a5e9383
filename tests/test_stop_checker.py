"""StopChecker: stop ids, eos, max/min tokens, stop strings across tokens, holdback of possible stop prefixes."""

import pytest

from qnext.engine.stop_checker import StopChecker
from qnext.sampling_params import SamplingParams
from qnext.tokenizer import IncrementalDetokenizer

EOS, STOP_ID, SPECIAL = 0, 1, 2


class ByteTok:
    """Each id is a byte string; specials decode to nothing when skipped. Decode is lossy UTF-8, as byte-level BPE."""

    def __init__(self, pieces):
        self.vocab = [b"", b"", b"<sp>"] + [p if isinstance(p, bytes) else p.encode() for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        skip = {EOS, STOP_ID, SPECIAL} if skip_special_tokens else set()
        return b"".join(self.vocab[i] for i in ids if i not in skip).decode("utf-8", errors="replace")

    def ids(self, *pieces):
        enc = [p if isinstance(p, bytes) else p.encode() for p in pieces]
        return [self.vocab.index(p) for p in enc]


TOK = ByteTok(["Hel", "lo", " wor", "ld", "EN", "D", "!", " E", "ND", "x", "\U0001F600".encode()[:2], "\U0001F600".encode()[2:]])


def checker(eos=(EOS,), cap=None, **kw):
    """`cap`: the engine's limit (max_model_len - prompt); params.max_tokens defaults to 50 here."""
    kw.setdefault("max_tokens", 50)
    p = SamplingParams(**kw)
    return StopChecker(p, eos, IncrementalDetokenizer(TOK, p.skip_special_tokens), max_tokens=cap)


def feed(c, ids):
    deltas = []
    for i in ids:
        if c.finished:
            break
        text, accepted = c.update([i])
        assert accepted == [i]
        deltas.append(text)
    return deltas


def test_eos_and_stop_token_ids():
    c = checker(stop_token_ids=[STOP_ID])
    feed(c, TOK.ids("Hel", "lo") + [EOS])
    assert (c.finish_reason, c.stop_reason, c.text, c.token_ids[-1]) == ("stop", None, "Hello", EOS)
    c = checker(stop_token_ids=[STOP_ID])
    feed(c, TOK.ids("Hel") + [STOP_ID])
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", STOP_ID, "Hel")
    c = checker(ignore_eos=True, max_tokens=3)
    feed(c, [EOS, EOS, EOS])
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("length", None, [EOS] * 3)


def test_max_tokens_and_engine_cap():
    c = checker(max_tokens=3)
    feed(c, TOK.ids("Hel", "lo", " wor", "ld"))
    assert (c.finish_reason, c.text, len(c.token_ids)) == ("length", "Hello wor", 3)
    c = checker(cap=2, max_tokens=None)  # params.max_tokens None: the engine's cap applies
    feed(c, TOK.ids("Hel", "lo", " wor"))
    assert c.finish_reason == "length" and len(c.token_ids) == 2
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(SamplingParams(max_tokens=None))


def test_min_tokens_suppresses_and_ignores_stops():
    c = checker(min_tokens=2, stop_token_ids=[STOP_ID], stop=["Hel"])
    assert set(c.suppressed_token_ids()) == {EOS, STOP_ID}
    feed(c, TOK.ids("Hel"))  # a stop string inside the first min_tokens tokens does not stop
    assert not c.finished and c.suppressed_token_ids() == (EOS, STOP_ID)
    feed(c, [EOS])  # a stray eos before min_tokens (the sampler should have masked it) is just text
    assert not c.finished and c.suppressed_token_ids() == ()
    feed(c, [EOS])
    assert c.finish_reason == "stop" and c.text == "Hel"
    assert checker(ignore_eos=True, min_tokens=1, stop_token_ids=[STOP_ID]).suppressed_token_ids() == (STOP_ID,)


def test_stop_string_split_across_tokens_is_cut_and_held_back():
    c = checker(stop=["END"])
    deltas = feed(c, TOK.ids("Hel", "lo", " E", "ND", "!"))
    assert deltas == ["Hel", "lo", " ", ""]  # "E" held (could start "END"), then cut with the match
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", "END", "Hello ")
    assert len(c.token_ids) == 4  # the token completing the match is kept; "!" never consumed


def test_held_text_is_released_when_it_cannot_match():
    c = checker(stop=["END!", "wor"])
    deltas = feed(c, TOK.ids("Hel", "lo", " E", "x", "EN", "D", "x"))
    assert deltas == ["Hel", "lo", " ", "Ex", "", "", "ENDx"]
    assert not c.finished and "".join(deltas) == c.text == "Hello ExENDx"


def test_held_text_is_released_at_length():
    c = checker(stop=["END"], max_tokens=3)
    deltas = feed(c, TOK.ids("Hel", "lo", "EN"))
    assert deltas == ["Hel", "lo", "EN"] and c.finish_reason == "length"


def test_earliest_stop_string_wins():
    c = checker(stop=["ld", "lo wor"])
    feed(c, TOK.ids("Hel", "lo", " wor", "ld"))
    assert (c.stop_reason, c.text) == ("lo wor", "Hel")


def test_multi_token_update_stops_midway():
    c = checker(stop=["END"])
    text, accepted = c.update(TOK.ids("Hel", "EN", "D", "!", "x"))
    assert (text, accepted, c.text, c.stop_reason) == ("Hel", TOK.ids("Hel", "EN", "D"), "Hel", "END")
    assert c.update(TOK.ids("x")) == ("", [])


def test_unfinished_character_is_held_then_flushed():
    half, rest = TOK.ids("\U0001F600".encode()[:2], "\U0001F600".encode()[2:])
    c = checker()
    assert feed(c, [half, rest]) == ["", "\U0001F600"]
    c = checker(max_tokens=2)
    assert feed(c, TOK.ids("x") + [half]) == ["x", "\ufffd"]  # at the end the broken tail is released as U+FFFD
    c = checker()
    feed(c, TOK.ids("x") + [half, EOS])
    assert c.text == "x\ufffd" and c.finish_reason == "stop"


def test_no_detokenizer_means_ids_only():
    c = StopChecker(SamplingParams(max_tokens=2), eos_token_ids=[EOS])
    assert c.update([5]) == ("", [5]) and c.update([6]) == ("", [6]) and c.finish_reason == "length"
    with pytest.raises(ValueError, match="tokenizer"):
        StopChecker(SamplingParams(stop=["x"]))


def test_abort():
    c = checker()
    c.abort()
    assert c.finish_reason == "abort" and c.update([3]) == ("", [])
