"""The static runner on a CPU (eager; its CUDA graphs are tested in test_cuda.py): the KV store
preallocated once with one fixed slot per row, greedy tokens equal to ``generate``, rows that never
move, slots freed by every way a request ends, and the typed errors of a budget that cannot work."""

from __future__ import annotations

import asyncio
import functools
import gc

import anyio
import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine.buckets import bucket, row_buckets, width_buckets
from async_llm.engine.runners import fast_forward
from async_llm.engine.slot_batch import SlotBatch
from async_llm.errors import ContextLengthError, InvalidParameterError, RequestAbortedError
from tests.conftest import PROMPTS, admitted_together, reference_ids
from tests.test_fast_decode import FAST, PLAIN


def _static(model, tokenizer, **kwargs) -> HuggingFaceLLM:
    options = {"max_batch_size": 8, "max_model_len": 256, "max_tokens": 24, **kwargs}
    return HuggingFaceLLM(model=model, tokenizer=tokenizer, device="cpu", runner="static", **options)


def _slots_in_use(batch: SlotBatch) -> set[int]:
    gc.collect()
    batch.slots_in_use()  # takes back the slots of dropped prefills
    return set(range(batch.num_slots)) - set(batch._free)


# -- buckets ------------------------------------------------------------------------------------------


def test_row_buckets_grow_by_eights_then_sixteens_and_end_at_the_batch_size():
    assert row_buckets(1) == [1]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    sizes = row_buckets(256)
    assert sizes[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and sizes[-1] == 256 and len(sizes) == 21
    assert all(b - a <= 16 for a, b in zip(sizes, sizes[1:]))
    assert bucket(9, sizes) == 16 and bucket(33, sizes) == 48 and bucket(256, sizes) == 256
    with pytest.raises(ValueError):
        bucket(257, sizes)
    with pytest.raises(ValueError):
        row_buckets(0)


def test_width_buckets_are_powers_of_two_up_to_the_slot():
    assert width_buckets(8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert width_buckets(300) == [128, 256, 300]
    assert width_buckets(64) == [64]


# -- the batch's slots ----------------------------------------------------------------------------------


def _batch(rows: int = 4, columns: int = 16) -> SlotBatch:
    return SlotBatch(
        2, 2, 4, vocab_size=10, max_rows=rows, columns=columns, device=torch.device("cpu"), dtype=torch.float32
    )


def _requests(n: int) -> list:
    from async_llm.engine.request import Request
    from async_llm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4)
    return [Request(f"r{i}", [1, 2, 3], params, None, None, frozenset()) for i in range(n)]  # type: ignore[arg-type]


def test_a_prefill_writes_into_the_slot_its_row_decodes_in_and_rows_never_move():
    batch = _batch()
    buffers = [batch.new_kv(3) for _ in range(3)]
    for i, kv in enumerate(buffers):
        kv.fill_(i + 1)
    assert [batch.slot_of(kv) for kv in buffers] == [0, 1, 2]
    requests = _requests(3)
    batch.add(requests, buffers, torch.tensor([5, 6, 7]), None, None)
    assert batch.slots == [0, 1, 2] and batch.row_lengths == [3, 3, 3]
    assert batch.tokens[:3].tolist() == [5, 6, 7] and batch.positions[:3].tolist() == [3, 3, 3]
    before = batch.kv[:, :, 2].clone()
    batch.remove([0])  # the first row leaves: the others keep their slots, nothing moves
    assert batch.slots == [2, 1] and [r.request_id for r in batch.rows] == ["r2", "r1"]
    assert torch.equal(batch.kv[:, :, 2], before)
    assert batch.positions[0] == batch.columns and batch.tokens[0] == 0  # parked on the scratch column
    assert batch.slot_index.tolist() == [2, 1]
    batch.advance(torch.tensor([8, 9]))
    assert batch.tokens[[2, 1]].tolist() == [8, 9] and batch.positions[[2, 1]].tolist() == [4, 4]
    assert batch.row_lengths == [4, 4]
    rows = batch.decode_rows()
    assert rows.input_ids.shape == (4, 1) and rows.width == 16  # slots [0, 3) bucket to 4; widths (16,)
    assert batch.new_kv(2) is not None and batch.slot_of(batch.row_kv(0)) == 2


def test_a_dropped_prefill_frees_its_slot_and_a_full_store_says_out_of_memory():
    batch = _batch(rows=2)
    kv = batch.new_kv(4)
    other = batch.new_kv(4)
    with pytest.raises(torch.OutOfMemoryError):
        batch.new_kv(4)
    del kv
    gc.collect()
    assert batch.slot_of(batch.new_kv(4)) == 0  # the dropped prefill's slot, taken again
    batch.add(_requests(1), [other], torch.tensor([1]), None, None)
    del other
    gc.collect()
    assert _slots_in_use(batch) == {1}  # the row keeps its slot after the prefill's buffer is gone
    with pytest.raises(ValueError, match="max_model_len"):
        batch.new_kv(17)


def test_rows_of_one_prompt_share_its_prefill_and_get_copies():
    batch = _batch()
    kv = batch.new_kv(3)
    kv.copy_(torch.randn_like(kv))
    batch.add(_requests(2), [kv, kv], torch.tensor([1, 2]), None, None)
    assert batch.slots == [0, 1]
    assert torch.equal(batch.row_kv(0), batch.row_kv(1))


# -- the runner in the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["native where it runs", "python"])
@pytest.mark.parametrize("name", sorted(FAST))
async def test_static_runner_gives_generates_greedy_tokens(name, layers, tiny_tokenizer, monkeypatch):
    """Greedy tokens equal ``generate``'s, through the CPU's native layers and through the Python
    layers (what CUDA runs), whose fresh prompts are written into the store and attended in groups."""
    model = FAST[name]()
    groups = []
    prompt_groups = fast_forward._prompt_groups

    def spy(*args):
        made = prompt_groups(*args)
        groups.extend(made[0])
        return made

    monkeypatch.setattr(fast_forward, "_prompt_groups", spy)
    async with _static(model, tiny_tokenizer) as llm:
        assert llm.engine.runner.name == "static"
        if layers == "python":
            llm.engine.runner.decoder.native = False
        calls = [
            functools.partial(llm.acomplete, p, chat_template=False, max_tokens=16, ignore_eos=True) for p in PROMPTS
        ]
        results = await admitted_together(llm, calls)  # their prompts prefill in one step
        assert _slots_in_use(llm.engine.batch) == set()
    if layers == "python":
        assert groups and all(g.slots is not None for g in groups), "the prompts were not written as a group"
    for prompt, result in zip(PROMPTS, results):
        expected = reference_ids(model, tiny_tokenizer(prompt).input_ids, 16)
        assert result.token_ids[: len(expected)] == expected


async def test_rows_keep_their_slot_while_others_join_and_leave(tiny_model, tiny_tokenizer):
    async with _static(tiny_model, tiny_tokenizer) as llm:
        batch = llm.engine.batch
        seen: dict[str, set[int]] = {}
        step = llm.engine.runner.run

        def watching(forward, b):
            for request, slot in zip(batch.rows, batch.slots):
                seen.setdefault(request.request_id, set()).add(slot)
            return step(forward, b)

        llm.engine.runner.run = watching  # type: ignore[method-assign]
        lengths = [4, 20, 8, 30, 2, 12]
        results = await asyncio.gather(
            *(
                llm.acomplete(p, chat_template=False, max_tokens=n, ignore_eos=True)
                for p, n in zip(PROMPTS * 2, lengths)
            )
        )
        assert [len(r.token_ids) for r in results] == lengths
        assert seen and all(len(slots) == 1 for slots in seen.values())
        assert _slots_in_use(batch) == set()


async def test_the_static_store_is_allocated_once_for_its_rows(tiny_model, tiny_tokenizer):
    async with _static(tiny_model, tiny_tokenizer, max_batch_size=4, max_model_len=128) as llm:
        batch = llm.engine.batch
        config = tiny_model.config
        per_token = (
            config.num_hidden_layers
            * 2
            * config.num_key_value_heads
            * (config.hidden_size // config.num_attention_heads)
            * 4
        )
        assert batch.kv.shape[2] == 4 and batch.kv.shape[4] == 129  # a scratch column past the 128
        store = batch.kv.data_ptr()
        await asyncio.gather(*(llm.arun(p, max_tokens=20, ignore_eos=True) for p in PROMPTS))
        assert batch.kv.data_ptr() == store  # never reallocated
        assert llm.engine.slots.bytes == 4 * 128 * per_token
        assert llm.max_context == 128


async def test_cancelled_and_aborted_requests_free_their_slots(tiny_model, tiny_tokenizer):
    async with _static(tiny_model, tiny_tokenizer) as llm:
        batch = llm.engine.batch
        stream = llm.astream("Hello", max_tokens=200, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()
        task = asyncio.ensure_future(llm.arun("The quick brown fox", max_tokens=200, ignore_eos=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, RequestAbortedError)):
            await task
        with anyio.fail_after(30):
            while llm.stats()["num_running"]:
                await asyncio.sleep(0.01)
        assert _slots_in_use(batch) == set()
        assert await llm.arun("Hello", max_tokens=4)


async def test_a_fault_in_a_static_step_fails_its_rows_and_frees_their_slots(tiny_model, tiny_tokenizer):
    from async_llm import GenerationError

    async with _static(tiny_model, tiny_tokenizer) as llm:
        decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
        step = decoder.step

        def broken(rows, chunks):
            if rows is not None:
                raise RuntimeError("injected fault")
            return step(rows, chunks)

        decoder.step = broken
        with pytest.raises(GenerationError, match="injected fault"):
            await llm.arun("Hello", max_tokens=8, ignore_eos=True)
        decoder.step = step
        assert _slots_in_use(llm.engine.batch) == set()
        assert await llm.arun("Hello", max_tokens=5)


async def test_seeded_sampling_penalties_prefix_cache_and_n_on_the_static_runner(tiny_model, tiny_tokenizer):
    """What the other runners do, the static one does: seeded samples repeat, penalties apply, a
    cached prefix is reused, and ``n`` rows share a prompt; each equals the fast runner's."""
    calls = [
        dict(prompt="Hello", max_tokens=12, temperature=0.9, seed=7, ignore_eos=True),
        dict(prompt="Hello", max_tokens=12, temperature=0.9, top_k=5, top_p=0.8, seed=3, ignore_eos=True),
        dict(
            prompt="The quick brown fox", max_tokens=12, frequency_penalty=1.5, repetition_penalty=1.3, ignore_eos=True
        ),
        dict(prompt=PROMPTS[2], max_tokens=8, n=3, temperature=1.0, seed=11, ignore_eos=True),
    ]

    async def run(llm):
        out = []
        for call in calls:
            call = dict(call)
            result = await llm.acomplete(call.pop("prompt"), chat_template=False, **call)
            out.append([c.token_ids for c in result] if isinstance(result, list) else result.token_ids)
        return out

    async with _static(tiny_model, tiny_tokenizer) as llm:
        first = await run(llm)
        again = await run(llm)  # the prompts' blocks are cached now
        assert llm.stats()["prefix_cache_hit_tokens"] > 0
        assert _slots_in_use(llm.engine.batch) == set()
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=24) as fast:
        assert fast.engine.runner.name == "fast"
        assert await run(fast) == first
    assert again == first


# -- bad input ------------------------------------------------------------------------------------------------


def test_static_runner_refuses_a_model_it_cannot_run(tiny_tokenizer):
    with pytest.raises(InvalidParameterError) as error:
        _static(PLAIN["gpt2"](), tiny_tokenizer)
    assert error.value.param == "runner"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        (dict(kv_cache_bytes=1024), "max_model_len"),  # not one row of 256 tokens
        (dict(kv_cache_bytes=3 * 256 * 1024, max_batch_size=8), "max_batch_size"),  # 2 rows of 8
        (dict(cuda_graphs=True), "cuda_graphs"),
        (dict(max_model_len=10**6), "max_model_len"),
    ],
)
def test_a_budget_that_cannot_work_is_a_typed_error_before_anything_runs(tiny_model, tiny_tokenizer, options, param):
    with pytest.raises(InvalidParameterError) as error:
        _static(tiny_model, tiny_tokenizer, **options)
    assert error.value.param == param


async def test_a_request_longer_than_a_slot_is_refused_before_it_is_queued(tiny_model, tiny_tokenizer):
    async with _static(tiny_model, tiny_tokenizer, max_model_len=64) as llm:
        with pytest.raises(ContextLengthError) as error:
            await llm.arun("word " * 80, chat_template=False)
        assert error.value.param == "prompt"
        with pytest.raises(ContextLengthError) as error:
            await llm.arun("Hello", max_tokens=100, chat_template=False)
        assert error.value.param == "max_tokens"
        assert llm.stats()["num_failed"] == 0 and await llm.arun("Hello", max_tokens=4)


def test_the_cpu_runners_keep_their_default_batch_size(tiny_model):
    from async_llm.engine.config import EngineConfig
    from async_llm.engine.core import DEFAULT_MAX_BATCH_SIZE, Engine

    engine = Engine(tiny_model, 0, EngineConfig())
    assert engine.scheduler.max_batch_size == DEFAULT_MAX_BATCH_SIZE and engine.slots is None
    assert engine.max_queue_tokens is None  # no KV budget to count tokens against: requests only
    engine = Engine(tiny_model, 0, EngineConfig(runner="static", max_model_len=128, kv_cache_bytes=1 << 22))
    per_token = 2 * 2 * 2 * 16 * 4  # layers, keys and values, kv heads, head dim, float32
    assert engine.scheduler.max_batch_size == min(256, (1 << 22) // (128 * per_token))
    # Queued work is bounded in tokens too: 8 turns of the whole store.
    assert engine.max_queue_tokens == 8 * engine.scheduler.max_batch_size * 128


@pytest.mark.parametrize("name", ["llama"])
def test_static_decode_step_is_one_call_with_no_host_copies(name, monkeypatch):
    """What a CUDA graph captures: the decode step reads nothing back from the device (no
    ``.item()``, ``.tolist()``, ``int(tensor)`` or host-built index)."""
    from async_llm.engine.runners.fast_forward import Chunk, FastDecoder

    model = FAST[name]()
    decoder = FastDecoder(model)
    config = model.config
    batch = SlotBatch(
        config.num_hidden_layers, config.num_key_value_heads, 16, 400, 4, 64, torch.device("cpu"), torch.float32
    )
    kv = batch.new_kv(3)
    decoder.prefill([Chunk([1, 2, 3], kv)])
    batch.add(_requests(1), [kv], torch.tensor([4]), None, None)
    rows = batch.rows_view(4, 64)

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the decode step")

    for name_ in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name_, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    logits = decoder.decode_rows(rows)
    monkeypatch.undo()
    assert logits.shape == (4, 400)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        expected = model(ids).logits[0, -1]
    assert torch.allclose(logits[0], expected, atol=1e-4, rtol=1e-4)


async def test_decode_graphs_replay_over_the_batchs_own_tensors(tiny_model, tiny_tokenizer, monkeypatch):
    """The graph bookkeeping on a CPU, with a stand-in for CUDA's graph API whose replay reruns the
    captured call on the same arguments: a graph is captured per (rows, width) bucket, replays read
    the batch's tensors as they are at that step, and the tokens equal ``generate``'s."""
    from contextlib import contextmanager

    from async_llm.engine.runners import cuda_graphs

    captured: list[tuple[int, int]] = []

    class Graph:
        def __init__(self) -> None:
            self.call = None

        def replay(self) -> None:
            decoder, rows, out = self.call
            original(decoder, rows, out)

        def pool(self) -> str:
            return "pool"

    original = cuda_graphs.FastDecoder.decode_rows
    recording: list[Graph] = []

    def decode_rows(decoder, rows, out=None):
        out = original(decoder, rows, out)
        if recording:
            recording[-1].call = (decoder, rows, out)
            captured.append((rows.input_ids.shape[0], rows.width))
        return out

    modes = []

    @contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        modes.append(capture_error_mode)
        recording.append(g)
        yield
        recording.pop()

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    @contextmanager
    def stream(s):
        yield

    monkeypatch.setattr(cuda_graphs.FastDecoder, "decode_rows", decode_rows)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    llm = _static(tiny_model, tiny_tokenizer, max_model_len=512)
    from async_llm.engine.runners.static import StaticRunner

    llm.engine.ready.wait()
    runner = llm.engine.runner
    assert isinstance(runner, StaticRunner) and runner.graphs is None  # a CPU: graphs off by default
    runner.graphs = cuda_graphs.DecodeGraphs(runner.decoder, runner.batch)
    runner.graphs.capture([(8, 128), (4, 128)])
    assert captured == [(8, 128), (4, 128)] and set(runner.graphs.graphs) == {(8, 128), (4, 128)}
    # Every graph's logits land in one buffer (no graph keeps its own); another thread's CUDA work
    # neither spoils a capture nor fails.
    assert {out.data_ptr() for _, out in runner.graphs.graphs.values()} == {runner.graphs._logits.data_ptr()}
    assert set(modes) == {"thread_local"}
    async with llm:
        results = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=150, ignore_eos=True) for p in PROMPTS)
        )
    assert (8, 256) in runner.graphs.graphs  # a wider step captured when it first ran
    for prompt, result in zip(PROMPTS, results):
        expected = reference_ids(tiny_model, tiny_tokenizer(prompt).input_ids, 150)
        assert result.token_ids[: len(expected)] == expected


@pytest.mark.parametrize("failure", ["check", "error"])
async def test_a_static_runner_that_fails_at_start_leaves_a_padded_batch_that_serves(
    failure, tiny_model, tiny_tokenizer, monkeypatch
):
    """Its start-up check refuses the model, or choosing the runner raises: the engine serves with
    the transformers runner over a padded batch, and the preallocated store is let go."""
    from async_llm.engine.batch import PaddedBatch
    from async_llm.engine.runners import fast_check

    def refusing(*args, **kwargs):
        if failure == "error":
            raise RuntimeError("injected")
        return None, "injected refusal"

    monkeypatch.setattr(fast_check, "prepare", refusing)
    async with _static(tiny_model, tiny_tokenizer) as llm:
        result = await llm.acomplete("Hello", chat_template=False, max_tokens=8, ignore_eos=True)
        assert llm.engine.runner.name == "transformers" and isinstance(llm.engine.batch, PaddedBatch)
        assert llm.engine.slots is None
    assert result.token_ids == reference_ids(tiny_model, tiny_tokenizer("Hello").input_ids, 8)


def test_the_budget_keeps_back_the_fused_copy_of_a_model_passed_in(tiny_model, monkeypatch):
    """A model passed in keeps its weights while the fast step holds a fused copy of q, k, v and of
    gate, up: that copy is kept out of the KV store's budget; the library's own model shares its
    weights with the fused products and keeps nothing back for them."""
    from async_llm.engine.config import EngineConfig
    from async_llm.engine.runners import static

    kept: list[int] = []

    def budget(device, utilization, kv_bytes, *, activation_bytes=0, **kwargs):
        kept.append(activation_bytes)
        return 1 << 30

    monkeypatch.setattr(static, "kv_budget_bytes", budget)
    config = EngineConfig(runner="static", max_model_len=64)
    for owned in (True, False):
        assert static.plan_static(tiny_model, config, torch.device("cpu"), owned=owned) is not None
    fused = sum(
        m.weight.numel() * m.weight.element_size() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
        for layer in tiny_model.model.layers
        for m in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
        )
    )
    assert fused > 0 and kept[1] - kept[0] == fused == static.fused_copy_bytes(tiny_model)
    int8 = EngineConfig(runner="static", max_model_len=64, quantize="int8")  # its own weights, no float copy
    assert static.plan_static(tiny_model, int8, torch.device("cpu"), owned=False) is not None
    assert kept[2] == kept[0]
