"""Incremental detokenization: UTF-8 safety and stop strings that span tokens."""

from __future__ import annotations

import pytest

from async_llm.engine.detokenizer import Detokenizer

TEXT = "Über café naïve résumé — 日本語のテキスト 🎉 emoji and ünïcödé."


def stream_deltas(tokenizer, ids, stop=(), prompt_ids=()):
    detok = Detokenizer(tokenizer, list(prompt_ids), stop)
    deltas = []
    for token in ids:
        stopped = detok.add_token(token)
        deltas.append(detok.take_delta(final=stopped))
        if stopped:
            break
    else:
        deltas.append(detok.take_delta(final=True))
    return [d for d in deltas if d], detok


def test_deltas_never_split_a_character(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    # The byte-level vocabulary really does split some characters across tokens.
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)
    deltas, _ = stream_deltas(tiny_tokenizer, ids)
    assert "".join(deltas) == TEXT
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # whole characters only: no lone surrogates


@pytest.mark.parametrize("stop", ["naïve", "ïve r", "日本", "🎉 emo", "é."])
def test_stop_string_spanning_tokens_is_cut_and_never_shown(tiny_tokenizer, stop):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    deltas, detok = stream_deltas(tiny_tokenizer, ids, stop=(stop,))
    expected = TEXT[: TEXT.index(stop)]
    assert detok.stopped
    assert "".join(deltas) == expected
    shown = ""
    for delta in deltas:  # no prefix of what was shown so far runs into the stop string
        shown += delta
        assert stop not in shown


def test_earliest_of_several_stop_strings_wins(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    deltas, _ = stream_deltas(tiny_tokenizer, ids, stop=("emoji", "café"))
    assert "".join(deltas) == "Über "


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tiny_tokenizer):
    ids = tiny_tokenizer("the lazy dog", add_special_tokens=False).input_ids
    deltas, detok = stream_deltas(tiny_tokenizer, ids, stop=("lazy cat",))
    assert not detok.stopped
    assert "".join(deltas) == "the lazy dog"


def test_slow_tokenizer_fallback(tiny_tokenizer):
    class Slow:  # no backend_tokenizer: exercises the re-decode path
        def decode(self, ids, skip_special_tokens=True):
            return tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    deltas, _ = stream_deltas(Slow(), ids, stop=("🎉",))
    assert "".join(deltas) == TEXT[: TEXT.index("🎉")]
    assert all("\ufffd" not in d for d in deltas)


def _fed(detok: Detokenizer, ids: list[int]) -> str:
    """All the text of ``ids`` fed one by one, each delta taken as it comes, then the last."""
    text = ""
    for token in ids:
        detok.add_token(token)
        text += detok.take_delta()
    return text + detok.take_delta(final=True)


@pytest.mark.parametrize("skip", [True, False])
def test_runs_of_special_tokens_decode_as_the_tokenizer_does_and_are_not_re_decoded(tiny_tokenizer, skip, monkeypatch):
    """Special tokens inside the text and a long run of them at its end (eos after eos, as when eos
    is ignored) give ``decode``'s text either way; skipped ones never reach the incremental
    decoder, which would otherwise decode the whole run again at every step."""
    from async_llm.engine import detokenizer

    special = tiny_tokenizer.eos_token_id
    words = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    ids = words[:5] + [special] * 3 + words[5:] + [special] * 200
    fed = []
    real = detokenizer.DecodeStream

    class Counting:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def step(self, backend, token):
            fed.append(token)
            return self.inner.step(backend, token)

    monkeypatch.setattr(detokenizer, "DecodeStream", Counting)
    detok = Detokenizer(tiny_tokenizer, [], skip_special_tokens=skip)
    text = _fed(detok, ids)
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    assert (special in fed) is not skip and len(fed) == (len(words) if skip else len(ids))


@pytest.mark.parametrize("skip", [True, False])
def test_a_slow_tokenizers_window_does_not_grow_over_skipped_special_tokens(tiny_tokenizer, skip):
    windows = []

    class Slow:  # no backend_tokenizer: the re-decode path
        all_special_ids = tiny_tokenizer.all_special_ids

        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    special = tiny_tokenizer.eos_token_id
    words = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    ids = words + [special] * 200
    detok = Detokenizer(Slow(), [], skip_special_tokens=skip)
    text = _fed(detok, ids)
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    if skip:  # without skipping, each special token has text and the window moves on as well
        assert max(windows[:-1]) <= 16  # not the run of 200 (the last decode is the final flush)
