"""The engine without its thread: built, driven step by step from the test, outputs by request id."""

from __future__ import annotations

from async_llm.engine.config import EngineConfig
from async_llm.engine.core import Engine
from async_llm.engine.detokenizer import Detokenizer
from async_llm.engine.output import FinishReason, RequestOutput
from async_llm.engine.request import Request
from async_llm.errors import EngineClosedError
from async_llm.sampling_params import SamplingParams
from tests.conftest import reference_ids


class ListSink:
    """An output sink that keeps what it is given (the engine calls it on the stepping thread)."""

    def __init__(self, alive: bool = True) -> None:
        self.batches: list[list[RequestOutput]] = []
        self.alive = alive

    def deliver(self, outputs: list[RequestOutput]) -> bool:
        self.batches.append(outputs)
        return self.alive

    def tokens(self, request_id: str) -> list[int]:
        return [t for batch in self.batches for o in batch if o.request_id == request_id for t in o.token_ids]

    def last(self, request_id: str) -> RequestOutput:
        return [o for batch in self.batches for o in batch if o.request_id == request_id][-1]


def _request(tokenizer, request_id: str, prompt: str, sink: ListSink, max_tokens: int) -> Request:
    ids = tokenizer(prompt).input_ids
    return Request(
        request_id=request_id,
        prompt_ids=ids,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        sink=sink,
        detokenizer=Detokenizer(tokenizer, ids),
        eos_token_ids=frozenset({2}),
    )


def test_an_engine_that_was_never_started_is_stepped_by_the_test(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, pad_token_id=0, config=EngineConfig(max_batch_size=4))
    sink = ListSink()
    requests = [
        _request(tiny_tokenizer, "a", "Hello", sink, 6),
        _request(tiny_tokenizer, "b", "The quick brown fox", sink, 9),
    ]
    for request in requests:
        engine.submit(request)
    assert engine.stats()["num_waiting"] == 2  # nothing runs until a step
    steps = 0
    while engine.stats()["num_finished"] < 2:
        assert engine.step()
        steps += 1
        assert steps < 50
    for request in requests:
        expected = reference_ids(tiny_model, request.prompt_ids, request.params.max_tokens)
        assert sink.tokens(request.request_id) == expected
        last = sink.last(request.request_id)
        assert last.finish_reason is FinishReason.LENGTH and last.error is None
    # One delivery per step at most: outputs of one step reach the sink together.
    assert len(sink.batches) <= steps + 2  # + the early flush of first tokens after a prefill
    assert engine.batch.size == 0
    engine.close()
    assert not engine.step()  # closed


def test_a_sink_whose_consumer_is_gone_gets_its_requests_aborted(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, pad_token_id=0, config=EngineConfig(max_batch_size=4))
    gone, alive = ListSink(alive=False), ListSink()
    engine.submit(_request(tiny_tokenizer, "gone", "Hello", gone, 40))
    engine.submit(_request(tiny_tokenizer, "alive", "Hello", alive, 5))
    for _ in range(10):
        engine.step()
    stats = engine.stats()
    assert stats["num_aborted"] == 1 and stats["num_finished"] == 1
    assert alive.tokens("alive") == reference_ids(tiny_model, tiny_tokenizer("Hello").input_ids, 5)
    engine.close()


def test_closing_an_unstarted_engine_ends_what_is_pending(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, pad_token_id=0)
    sink = ListSink()
    engine.submit(_request(tiny_tokenizer, "a", "Hello", sink, 5))
    engine.close()
    last = sink.last("a")
    assert last.finish_reason is FinishReason.ABORT and isinstance(last.error, EngineClosedError)
    assert engine.stats()["num_aborted"] == 1


def test_the_kv_buffer_is_sized_at_admission_and_never_regrown_while_decoding(tiny_model, tiny_tokenizer):
    """Growing the buffer copies all of it: a spike in every stream's inter-token latency. Rows that
    join reserve the columns they may still generate, so decoding writes in place to the end."""
    engine = Engine(tiny_model, pad_token_id=0, config=EngineConfig(max_batch_size=4))
    sink = ListSink()
    for i, prompt in enumerate(["Hello", "The quick brown fox"]):
        engine.submit(_request(tiny_tokenizer, str(i), prompt, sink, 150))
    engine.step()  # admits, prefills, first decode
    buffer = engine.batch.kv
    assert buffer is not None
    while engine.stats()["num_finished"] < 2:
        engine.step()
        assert engine.batch.size == 0 or engine.batch.kv is buffer
    engine.close()


def test_an_idle_batch_keeps_its_buffer_for_the_next_rows(tiny_model, tiny_tokenizer):
    """When the last row leaves, the buffer is kept aside (no row's keys and values are held) and
    the next rows that fit it write into it, with the same tokens as in a fresh one; rows that do
    not fit it get a larger one."""
    engine = Engine(tiny_model, pad_token_id=0, config=EngineConfig(max_batch_size=4))
    sink = ListSink()

    def run(tag: str, prompts: list[str], max_tokens: int) -> tuple[object, list[list[int]]]:
        for i, prompt in enumerate(prompts):
            engine.submit(_request(tiny_tokenizer, f"{tag}{i}", prompt, sink, max_tokens))
        engine.step()
        buffer = engine.batch.kv
        while engine.stats()["num_running"] or engine.stats()["num_waiting"]:
            engine.step()
        assert engine.batch.kv is None and not engine.batch.holds_rows()
        return buffer, [sink.tokens(f"{tag}{i}") for i in range(len(prompts))]

    first, tokens = run("a", ["Hello", "The quick brown fox"], 20)
    again, tokens_again = run("b", ["Hello", "The quick brown fox"], 20)
    assert again is first and tokens_again == tokens  # stale contents never read
    larger, _ = run("c", ["Hello", "The quick brown fox", "One", "Two"], 300)
    assert larger is not first and larger.shape[2] >= 4 and larger.shape[4] > first.shape[4]
    engine.close()
