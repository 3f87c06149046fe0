"""Property-based bad input: every prompt and sampling value gets a typed error or a correct answer."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_llm import HuggingFaceLLM
from tests.stress.conftest import scaled

TYPED = (TypeError, ValueError)  # UnicodeEncodeError (lone surrogates) is a ValueError too

prompts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=50),  # lone surrogates, controls
    st.sampled_from(["", " ", "\n\t ", "\x00\x01\x02", "\u200b\u200d", "é" * 300, "word " * 3000]),
    st.integers(),
    st.none(),
    st.binary(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "bot"]), "content": st.text(max_size=20)}), max_size=2
    ),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        name: numbers
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "seed",
            "n",
            "num_beams",
            "length_penalty",
            "max_length",
        )
    }
    | {
        "max_tokens": st.one_of(numbers, st.integers(min_value=1, max_value=8)),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), numbers),
        "ignore_eos": st.one_of(st.booleans(), numbers),
        "do_sample": st.one_of(st.booleans(), numbers),
    },
)


@pytest.fixture(scope="module")
def shared_llm(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=6, max_batch_size=8) as llm:
        yield llm


@pytest.fixture(scope="module")
def good_traffic(shared_llm):
    """Correct requests running the whole time on another thread; each must match its solo text."""
    expected = shared_llm.run("Hello", max_tokens=12, ignore_eos=True)
    stop = threading.Event()
    results: list[bool] = []

    def loop() -> None:
        while not stop.is_set():
            results.append(shared_llm.run("Hello", max_tokens=12, ignore_eos=True) == expected)

    thread = threading.Thread(target=loop)
    thread.start()
    yield results
    stop.set()
    thread.join(60)


@settings(max_examples=scaled(300, minimum=30), deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=prompts, overrides=fields)
def test_bad_input_gets_a_typed_error_or_an_answer(shared_llm, good_traffic, prompt, overrides):
    overrides.setdefault("max_tokens", 4)
    try:
        result = shared_llm.run(prompt, **overrides)
    except TYPED:
        return
    assert isinstance(result, (str, list))
    if isinstance(result, list):
        assert len(result) == overrides.get("n", 1) and all(isinstance(t, str) for t in result)


def test_good_traffic_was_never_disturbed(shared_llm, good_traffic):
    # Runs after the property test in this module: the engine is still up and every good result matched.
    assert good_traffic and all(good_traffic)
    stats = shared_llm.stats()
    assert stats["num_failed"] == 0
    print(f"bad input: {stats['num_finished']} requests served beside the fuzzing, 0 failed")
