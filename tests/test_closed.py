"""A closed LLM refuses new calls at every entry point, a subclass's own ``run``/``astream`` included."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from async_llm import BaseLLM, EngineClosedError, HuggingFaceLLM


class Echo(BaseLLM):
    """A minimal subclass: only a sync ``run`` (nothing of BaseLLM runs before it is called)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[Any] = []

    def run(self, task: Any = None, *args: Any, **kwargs: Any) -> str:
        self.calls.append(task)
        return f"echo {task}"


class Words(BaseLLM):
    """A minimal async subclass: only ``astream``."""

    def astream(self, prompt: Any, **overrides: Any) -> AsyncIterator[str]:
        async def words() -> AsyncIterator[str]:
            for word in str(prompt).split():
                yield word

        return words()


SYNC_CALLS = {
    "run": lambda llm: llm.run("x"),
    "__call__": lambda llm: llm("x"),
    "batch_run": lambda llm: llm.batch_run(["x"]),
    "chat": lambda llm: llm.chat("x"),
    "generate": lambda llm: llm.generate("x"),
    "generate_text": lambda llm: llm.generate_text("x"),
    "generate_summary": lambda llm: llm.generate_summary("x"),
    "time_to_first_token": lambda llm: llm.time_to_first_token("x"),
    "generation_latency": lambda llm: llm.generation_latency("x"),
    "throughput": lambda llm: llm.throughput(["x"]),
}
ASYNC_CALLS = {
    "arun": lambda llm: llm.arun("x"),
    "abatch_run": lambda llm: llm.abatch_run(["x"]),
    "achat": lambda llm: llm.achat("x"),
    "agenerate": lambda llm: llm.agenerate("x"),
    "agenerate_summary": lambda llm: llm.agenerate_summary("x"),
}


@pytest.mark.parametrize("cls", [Echo, Words])
def test_every_sync_entry_point_refuses_a_closed_llm(cls):
    llm = cls()
    assert llm.run("x y") and not llm.closed  # serves before close
    llm.close()
    assert llm.closed
    calls_before = list(getattr(llm, "calls", []))
    for name, call in SYNC_CALLS.items():
        with pytest.raises(EngineClosedError, match="is closed"):
            call(llm)
        assert getattr(llm, "calls", []) == calls_before, name  # the subclass's run was never reached


@pytest.mark.parametrize("cls", [Echo, Words])
async def test_every_async_entry_point_refuses_a_closed_llm(cls):
    llm = cls()
    assert await llm.arun("x y")
    await llm.aclose()
    calls_before = list(getattr(llm, "calls", []))
    for call in ASYNC_CALLS.values():
        with pytest.raises(EngineClosedError):
            await call(llm)
    with pytest.raises(EngineClosedError):
        llm.astream("x")  # at the call, before any iteration
    with pytest.raises(EngineClosedError):
        llm.amap(["x"])
    assert getattr(llm, "calls", []) == calls_before


def test_a_closed_llm_still_saves_a_checkpoint_without_keeping_a_thread(tmp_path):
    llm = Echo(system_prompt="Be brief.")
    assert llm.batch_run(["x"]) == ["echo x"]  # recorded (a subclass's own run is not timed)
    llm.close()
    before = sum(t.name == "async-llm-sync" for t in threading.enumerate())
    path = llm.save_checkpoint(tmp_path / "ckpt")
    assert path.exists()
    assert sum(t.name == "async-llm-sync" for t in threading.enumerate()) == before
    restored = Echo()
    restored.load_checkpoint(path)
    assert restored.system_prompt == "Be brief." and restored.metrics()["requests"] == 1
    restored.close()


async def test_huggingface_llm_refuses_at_the_call_once_closed(tiny_model, tiny_tokenizer):
    llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=2)
    with anyio.fail_after(30):
        assert await llm.arun("Hello")
        await llm.aclose()
        with pytest.raises(EngineClosedError):
            llm.astream("Hello")
        for call in (llm.submit, llm.submit_many, llm.acomplete, llm.arun):
            with pytest.raises(EngineClosedError):
                await call("Hello")
    with pytest.raises(EngineClosedError):
        llm.run("Hello")
