"""LangChain's standard suites (langchain-tests) for :class:`ChatAsyncLLM` on the default model.

Marked ``langchain``: deselected by the plain run; ``.ci/run`` installs the ``langchain`` extra and
``langchain-tests`` and runs ``-m langchain``. Every test the suites skip, and why, is listed in the
README (section "LangChain").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip(
    "langchain_tests", reason="needs langchain-tests (pip install 'async-llm[langchain]' langchain-tests)"
)

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from async_llm.integrations.langchain import ChatAsyncLLM

pytestmark = pytest.mark.langchain

# Why the tests skipped below do not pass on the 135M default model (the same list is in the README).
# Each is a property of the model's greedy text, not of the adapter: the requests, tools, grammars
# and parsing they exercise are covered by the tests that pass.
LOOPS = "the 135M model, greedy, repeats one phrase inside the JSON string until max_tokens cuts it off"
REPEATS_CALLS = "the 135M model, forced to call a tool, repeats the call until max_tokens cuts the list off"
NO_AUTO_TOOLS = "the 135M model does not call tools when tool_choice is auto"
JSON_MODE = "JSON mode constrains the syntax only, and the 135M model leaves out the 'punchline' key"

PARAMS: dict[str, Any] = {"engine_kwargs": {"device": "cpu", "max_tokens": 64}}  # the engine's default length


@pytest.fixture(scope="module", autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    ChatAsyncLLM.close_shared_engines()


class _ChatAsyncLLM:
    """What both suites are told about the model."""

    @property
    def chat_model_class(self) -> type[ChatAsyncLLM]:
        return ChatAsyncLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return PARAMS

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatAsyncLLMUnit(_ChatAsyncLLM, ChatModelUnitTests):
    pass


class TestChatAsyncLLMIntegration(_ChatAsyncLLM, ChatModelIntegrationTests):
    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """The second of two requests behind one long system prompt reads it from the prefix cache."""
        model = ChatAsyncLLM(**PARAMS)
        system = "You are a careful assistant. Answer every question in one short sentence. " * 8
        messages = [SystemMessage(system), HumanMessage("Hello")]
        model.invoke(messages)
        if stream:
            message = None
            for chunk in model.stream(messages):
                message = chunk if message is None else message + chunk
        else:
            message = model.invoke(messages)
        assert isinstance(message, AIMessage | AIMessageChunk)
        details = (message.usage_metadata or {}).get("input_token_details") or {}
        assert details.get("cache_read", 0) > 0  # the suite checks it is an int; here it must count
        return message  # type: ignore[return-value]

    # The suite's rule: an overridden standard test is marked xfail with its reason. These run in
    # full (strict=False: the ones the model happens to get right show as XPASS).
    @pytest.mark.xfail(reason=LOOPS + " (the pydantic schema; the others pass)", strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: Any, schema_type: Any) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=LOOPS + " (the pydantic schema; the others pass)", strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: Any, schema_type: Any) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=LOOPS, strict=False)
    def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=JSON_MODE, strict=False)
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=REPEATS_CALLS, strict=False)
    def test_tool_calling_with_no_arguments(self, model: Any) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=LOOPS, strict=False)
    def test_unicode_tool_call_integration(
        self, model: Any, *, tool_choice: Any = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)

    @pytest.mark.xfail(reason=NO_AUTO_TOOLS, strict=False)
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)
