"""Stress tests: marked ``stress`` (left out of the quick run); ``STRESS_SCALE`` scales them.

``STRESS_SCALE=1`` (the default) is the full size the reliability figures are quoted at;
``.ci/run`` runs a short version with a smaller scale.

The fault, cancellation-storm and bad-input tests run over the model runners (the ``runner``
fixture): the CPU default, the static runner run eagerly on a CPU, the CPU default with n-gram
speculation (verify steps at every batch size) and with int8 products, and the static runner on
CUDA with its captured decode graphs (marked ``cuda``: skipped without a GPU).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from async_llm import HuggingFaceLLM
from async_llm.engine.slot_batch import SlotBatch
from tests.conftest import build_model

SCALE = float(os.environ.get("STRESS_SCALE", "1"))


def scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * SCALE))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/stress/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.stress)


@dataclass
class Runner:
    """How a test builds its LLM on one of the runners.

    Attributes:
        id: The test id's suffix: ``default``, ``static`` or ``cuda``.
        name: The engine's runner name the LLM must end up with (``llm.engine.runner.name``).
        model, tokenizer: The tiny model (a fresh copy on the GPU for ``cuda``: the session's stays
            on the CPU for the other tests) and its tokenizer.
        options: Keyword arguments of ``HuggingFaceLLM`` that pick the runner; a test's own win.
    """

    id: str
    name: str
    model: Any
    tokenizer: Any
    options: dict[str, Any] = field(default_factory=dict)

    def llm(self, **kwargs: Any) -> HuggingFaceLLM:
        """A new LLM on this runner (``kwargs`` over :attr:`options`), started; use it as a context
        manager."""
        instance = HuggingFaceLLM(model=self.model, tokenizer=self.tokenizer, **{**self.options, **kwargs})
        try:  # the engine chooses its runner when it starts, on its own thread
            assert instance.engine.ready.wait(120), "the engine did not start"
            assert instance.engine.runner.name == self.name, (self.id, instance.engine.runner.name)
        except BaseException:
            instance.close()
            raise
        return instance


#: The static runner's store, slots x columns: max_batch_size (a test may ask for more rows) x 256
#: tokens keeps it tiny (512 bytes a token for the tiny model: 1 MiB at 8 rows), and every test's
#: prompt and output fit. The budget is given outright: derived from the memory the machine has free
#: (the default), the store would not start on a machine whose other processes use half of it.
STATIC = {"max_batch_size": 8, "max_model_len": 256, "kv_cache_bytes": 64 * 2**20}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("default", id="default"),
        pytest.param("static", id="static"),
        pytest.param("ngram", id="ngram"),
        pytest.param("static-ngram", id="static-ngram"),
        pytest.param("int8", id="int8"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
    ],
)
def runner(request: pytest.FixtureRequest, tiny_model: Any, tiny_tokenizer: Any) -> Runner:
    """The runner a test builds its LLM on (module scope: a module's tests are grouped by runner)."""
    if request.param == "default":  # on a CPU: the fast runner for this Llama
        return Runner("default", "fast", tiny_model, tiny_tokenizer, {"device": "cpu"})
    if request.param == "static":  # eager on a CPU
        return Runner("static", "static", tiny_model, tiny_tokenizer, {"device": "cpu", "runner": "static", **STATIC})
    if request.param == "ngram":  # verify steps at any batch size (drafts from each row's own context)
        spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "disable_by_batch_size": 64}
        return Runner("ngram", "fast", tiny_model, tiny_tokenizer, {"device": "cpu", "speculative_config": spec})
    if request.param == "static-ngram":  # verify steps over fixed slots, eager on a CPU
        spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "disable_by_batch_size": 64}
        options = {"device": "cpu", "runner": "static", **STATIC, "speculative_config": spec}
        return Runner("static-ngram", "static", tiny_model, tiny_tokenizer, options)
    if request.param == "int8":
        return Runner("int8", "fast", tiny_model, tiny_tokenizer, {"device": "cpu", "quantize": "int8"})
    # The default on CUDA: the static runner with captured graphs. The same weights (same seed).
    model = build_model(len(tiny_tokenizer)).cuda()
    return Runner("cuda", "static", model, tiny_tokenizer, {"device": "cuda", **STATIC})


def assert_released(llm: HuggingFaceLLM) -> None:
    """Every request has ended: no row or prefill holds KV memory, and no slot of a static store is
    in use. Call it once the engine is idle (a dropped prefill's slot is reclaimed after the
    collection that frees its buffer)."""
    gc.collect()
    batch = llm.engine.batch
    assert not batch.rows and not batch.holds_rows()
    if isinstance(batch, SlotBatch):
        assert batch.slots_in_use() == 0, f"{batch.slots_in_use()} of {batch.num_slots} slots still in use"
