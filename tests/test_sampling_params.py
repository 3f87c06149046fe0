"""Validation of every sampling parameter and prompt, before anything is queued."""

from __future__ import annotations

import math

import pytest

from async_llm import SamplingParams

BAD_VALUES = [
    ("max_tokens", 0, ValueError, "max_tokens"),
    ("max_tokens", -5, ValueError, "max_tokens"),
    ("max_tokens", 2.5, TypeError, "max_tokens"),
    ("max_tokens", True, TypeError, "max_tokens"),
    ("temperature", -0.1, ValueError, "temperature"),
    ("temperature", math.nan, ValueError, "temperature"),
    ("temperature", math.inf, ValueError, "temperature"),
    ("temperature", "hot", TypeError, "temperature"),
    ("top_k", -2, ValueError, "top_k"),
    ("top_k", 1.5, ValueError, "top_k"),  # a whole float (40.0) is taken; 1.5 is out of range
    ("top_p", 0.0, ValueError, "top_p"),
    ("top_p", 1.01, ValueError, "top_p"),
    ("min_p", -0.1, ValueError, "min_p"),
    ("min_p", 1.5, ValueError, "min_p"),
    ("repetition_penalty", 0.0, ValueError, "repetition_penalty"),
    ("repition_penalty", -1.0, ValueError, "repetition_penalty"),
    ("frequency_penalty", 2.5, ValueError, "frequency_penalty"),
    ("presence_penalty", -2.01, ValueError, "presence_penalty"),
    ("seed", -1, ValueError, "seed"),
    ("seed", "42", TypeError, "seed"),
    ("stop", 3, TypeError, "stop"),
    ("stop", ["ok", 4], TypeError, "stop"),
    ("stop", [""], ValueError, "stop"),
    ("stop_token", [""], ValueError, "stop"),
    ("ignore_eos", "yes", TypeError, "ignore_eos"),
    ("do_sample", 1, TypeError, "do_sample"),
]


@pytest.mark.parametrize(("name", "value", "error", "field"), BAD_VALUES)
def test_bad_value_names_the_field(name, value, error, field):
    with pytest.raises(error, match=field):
        SamplingParams().merge(**{name: value})


def test_range_is_in_the_message():
    with pytest.raises(ValueError, match=r"top_p must be in \(0.0, 1.0\]"):
        SamplingParams(top_p=2)
    with pytest.raises(ValueError, match=r"\[-2.0, 2.0\]"):
        SamplingParams(frequency_penalty=3)


def test_aliases_and_normalisation():
    p = SamplingParams().merge(repition_penalty=1.3, stop_token="###", top_k=-1, max_new_tokens=9)
    assert p.repetition_penalty == 1.3
    assert p.stop == ("###",)
    assert p.top_k == 0
    assert p.max_tokens == 9
    with pytest.raises(TypeError, match="given twice"):
        SamplingParams().merge(stop="a", stop_token="b")
    with pytest.raises(TypeError, match="unknown sampling parameter 'temprature'"):
        SamplingParams().merge(temprature=0.5)


def test_greedy_rules():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(temperature=0.7, do_sample=False).greedy
    forced = SamplingParams(do_sample=True)
    assert not forced.greedy and forced.effective_temperature == 1.0


async def test_llm_rejects_bad_input_before_queueing(llm):
    before = llm.stats()
    with pytest.raises(TypeError, match="prompt must be a str"):
        llm.astream(123)  # raises at call time, before iteration
    with pytest.raises(TypeError, match="prompt must be a str"):
        await llm.arun(None)
    with pytest.raises(ValueError, match="temperature"):
        await llm.arun("hi", temperature=-1)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        await llm.arun("hi", foo=1)
    with pytest.raises(TypeError, match="list of prompts"):
        await llm.abatch_run("not a list")
    with pytest.raises(TypeError, match="prompt must be a str"):
        await llm.abatch_run(["ok", 5])
    with pytest.raises(ValueError, match="empty"):
        await llm.arun("", chat_template=False)
    with pytest.raises(ValueError, match="empty list of messages"):
        await llm.arun([])
    with pytest.raises(TypeError, match="message 0"):
        await llm.arun([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="role 'wizard'"):
        await llm.arun([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode: lone surrogate '\\udc80' at index 2"):
        await llm.arun("ab\udc80")
    with pytest.raises(ValueError, match="prompt message 1 is not valid Unicode"):
        await llm.arun([{"role": "system", "content": "ok"}, {"role": "user", "content": "\ud800"}])
    with pytest.raises(ValueError, match="context of 1024 tokens"):
        await llm.arun("word " * 2000)
    with pytest.raises(ValueError, match="max_tokens"):
        await llm.arun("hi", max_tokens=1020)
    after = llm.stats()
    assert after["num_finished"] == before["num_finished"] and after["num_waiting"] == 0
    assert await llm.arun("Hello", max_tokens=5)  # the engine serves normally afterwards


async def test_bad_defaults_raise_at_construction(tiny_model, tiny_tokenizer):
    from async_llm import HuggingFaceLLM

    with pytest.raises(ValueError, match="top_p"):
        HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, top_p=0)
