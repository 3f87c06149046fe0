"""Property-based bad input: every prompt and sampling value gets a typed error or a correct answer;
on each runner (the ``runner`` fixture: the CPU default, the static runner on a CPU and on CUDA)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_llm import HuggingFaceLLM
from tests.stress.conftest import Runner, assert_released, scaled

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
def shared_llm(runner: Runner) -> Iterator[HuggingFaceLLM]:
    with runner.llm(max_tokens=6, max_batch_size=8) as llm:
        yield llm


class GoodTraffic:
    """Correct requests running on another thread until :meth:`stop`; each must match its solo text."""

    def __init__(self, llm: HuggingFaceLLM) -> None:
        self.expected = llm.run("Hello", max_tokens=12, ignore_eos=True)
        self.results: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(llm,))
        self._thread.start()

    def _loop(self, llm: HuggingFaceLLM) -> None:
        while not self._stop.is_set():
            self.results.append(llm.run("Hello", max_tokens=12, ignore_eos=True) == self.expected)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def good_traffic(shared_llm: HuggingFaceLLM) -> Iterator[GoodTraffic]:
    """Good traffic over ``shared_llm`` for as long as its module's tests run (on one runner)."""
    traffic = GoodTraffic(shared_llm)
    yield traffic
    traffic.stop()


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
    # Runs after the property test in this module (on the same runner): the engine is still up and
    # every good result matched; once the traffic stops, every row and slot is free again.
    good_traffic.stop()
    assert good_traffic.results and all(good_traffic.results)
    stats = shared_llm.stats()
    assert stats["num_failed"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert_released(shared_llm)
    print(f"bad input: {stats['num_finished']} requests served beside the fuzzing, 0 failed")
