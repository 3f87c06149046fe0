"""LlamaIndex: :class:`AsyncLLM` and :class:`AsyncLLMEmbedding` in the framework's own usage (a
FunctionAgent calling a tool, a query over a small index), the same text as the engine in every
chat and completion form, structured prediction, typed errors.

Marked ``llamaindex``: deselected by the plain run; ``.ci/run`` installs the ``llamaindex`` extra
and runs them.
"""

from __future__ import annotations

from typing import Literal

import anyio
import pytest
from pydantic import BaseModel

pytest.importorskip("llama_index.core", reason="needs the llamaindex extra")

from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from async_llm import HuggingFaceLLM, InvalidParameterError
from async_llm.integrations.llamaindex import AsyncLLM, AsyncLLMEmbedding

pytestmark = [
    pytest.mark.llamaindex,
    # Raised inside llama-index's workflow package (inspect.getmembers over its pydantic objects
    # touches their deprecated attributes), not by this project; the suite turns every deprecation
    # warning into an error.
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]


class Verdict(BaseModel):
    answer: Literal["yes", "no"]


async def test_chat_and_completion_say_what_the_engine_says(llm):
    model = AsyncLLM(llm=llm, max_tokens=10)
    expected = await llm.arun([{"role": "user", "content": "Hello"}], max_tokens=10)
    assert (await model.acomplete("Hello")).text == expected
    assert (await model.achat([ChatMessage(role="user", content="Hello")])).message.content == expected
    streamed = [r async for r in await model.astream_chat([ChatMessage(role="user", content="Hello")])]
    assert streamed and streamed[-1].message.content == expected == "".join(r.delta or "" for r in streamed)
    assert model.complete("Hello").text == expected  # sync, inside a running loop
    assert [r.delta for r in model.stream_complete("Hello")] and model.metadata.is_function_calling_model
    with pytest.raises(InvalidParameterError) as bad:
        await AsyncLLM(llm=llm, temperature=-1.0).acomplete("Hi")
    assert bad.value.param == "temperature"


async def test_structured_prediction_is_a_forced_call_the_grammar_keeps_to_the_schema(llm):
    model = AsyncLLM(llm=llm, max_tokens=64)
    verdict = await model.astructured_predict(Verdict, PromptTemplate("Is {thing} blue?"), thing="the sky")
    assert isinstance(verdict, Verdict)  # a random model: its answer, but in the schema


@pytest.mark.slow
async def test_a_function_agent_calls_a_tool_and_answers():
    calls: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls.append((a, b))
        return a * b

    async with HuggingFaceLLM(device="cpu", max_tokens=64) as engine:
        agent = FunctionAgent(
            tools=[FunctionTool.from_defaults(fn=multiply)], llm=AsyncLLM(llm=engine, temperature=0),
            system_prompt="Use the tools.", initial_tool_choice="multiply",
        )  # fmt: skip
        with anyio.fail_after(120):
            result = await agent.run("What is 3 times 4? Use the multiply tool.")
    assert calls and calls[0] == (3, 4)  # the tool ran with the question's numbers
    assert "12" in str(result)


@pytest.mark.slow
async def test_a_query_over_a_small_index_runs_on_the_engine(monkeypatch):
    async with HuggingFaceLLM(device="cpu", max_tokens=48) as engine:
        monkeypatch.setattr(Settings, "_tokenizer", lambda text: engine.tokenizer(text).input_ids)
        embed = AsyncLLMEmbedding(llm=engine)
        documents = [Document(text="The Eiffel Tower is in Paris."), Document(text="The Colosseum is in Rome.")]
        index = VectorStoreIndex.from_documents(documents, embed_model=embed)
        engine_query = index.as_query_engine(llm=AsyncLLM(llm=engine, temperature=0), similarity_top_k=1)
        with anyio.fail_after(120):
            response = await engine_query.aquery("Where is the Eiffel Tower?")
            vectors = await engine.aembed([d.text for d in documents])
    assert str(response).strip()
    assert len(response.source_nodes) == 1 and response.source_nodes[0].node.get_content() in {
        d.text for d in documents
    }
    stored = [index.vector_store.get(node_id) for node_id in index.index_struct.nodes_dict.values()]
    assert sorted(map(tuple, stored)) == sorted(map(tuple, vectors))  # the index holds the engine's embeddings
