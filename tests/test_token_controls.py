"""Token controls on the tiny model: stop_token_ids, min_tokens, logit_bias, bad_words,
allowed_token_ids, include_stop_str_in_output, skip_special_tokens, logits processors, and their
validation.

Expected outputs come from a reference greedy decoder (a full forward per token, no cache) that
applies the documented rule to the logits, so every test checks the exact tokens, not just a property
of them. Prompts are encoded without the chat template to keep the token ids easy to read.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

import anyio
import pytest
import torch
from conftest import admitted_together, reference_ids

from async_llm import GenerationError, InvalidParameterError, ParameterError, ParameterTypeError

EOS = 2
IM_START = 1  # "<|im_start|>", a special token the tiny model generates after "Hello"
# "def hello(name):" -> greedy "J bickcacacacaca...": [44 'J', 288 ' b', 320 'ick', 264 'ca', ...]
CODE = "def hello(name):"

Adjust = Callable[[list[int], torch.Tensor], torch.Tensor]


def greedy_with(
    model, prompt_ids: list[int], max_tokens: int, adjust: Adjust | None = None, end_ids: frozenset[int] = frozenset()
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` where ``adjust(output_ids, logits)`` edits each step's
    ``[V]`` logits first; stops after a token of ``end_ids`` (included) or ``max_tokens``."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([prompt_ids + out])).logits[0, -1].float()  # [V]
            if adjust is not None:
                logits = adjust(out, logits.clone())
            out.append(int(logits.argmax()))
            if out[-1] in end_ids:
                break
    return out


def ban(ids: Callable[[list[int]], list[int]]) -> Adjust:
    """An ``adjust`` that sets the logits of ``ids(output_ids)`` to -inf."""

    def adjust(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[ids(out)] = float("-inf")
        return logits

    return adjust


async def greedy(llm, prompt: str, max_tokens: int = 12, **kw):
    with anyio.fail_after(30):
        return await llm.acomplete(prompt, chat_template=False, max_tokens=max_tokens, **kw)


def assert_nothing_queued(llm) -> None:
    stats = llm.stats()
    assert stats["num_waiting"] == 0 and stats["num_running"] == 0


async def run_admitted_together(llm, calls: list[dict]) -> list:
    """One request per kwargs dict, admitted by the engine in one step (so they share the batch)."""
    results = await admitted_together(llm, [functools.partial(greedy, llm, **kw) for kw in calls])
    assert llm.stats()["peak_batch_size"] == len(calls)
    return results


# -- stop_token_ids ------------------------------------------------------------------------------------------


async def test_stop_token_id_ends_the_request_on_that_token(llm, tiny_tokenizer):
    plain = await greedy(llm, CODE, ignore_eos=True)
    assert plain.token_ids[:4] == [44, 288, 320, 264]  # the ids this file's choices rely on
    done = await greedy(llm, CODE, stop_token_ids=[264])
    assert done.token_ids == [44, 288, 320, 264]
    assert done.finish_reason == "stop"
    assert done.text == "J bick" == tiny_tokenizer.decode([44, 288, 320])
    with anyio.fail_after(30):
        assert await llm.arun(CODE, chat_template=False, stop_token_ids=[264]) == "J bick"
        streamed = [d async for d in llm.astream(CODE, chat_template=False, stop_token_ids=[264])]
    assert "".join(streamed) == "J bick"


async def test_earliest_of_several_stop_token_ids_wins_even_as_first_token(llm):
    plain = await greedy(llm, CODE, ignore_eos=True)
    later = await greedy(llm, CODE, stop_token_ids=[plain.token_ids[9], plain.token_ids[2]])
    assert later.token_ids == plain.token_ids[:3] and later.finish_reason == "stop"
    first = await greedy(llm, CODE, stop_token_ids=[plain.token_ids[0]], ignore_eos=True)
    assert first.token_ids == plain.token_ids[:1] and first.text == "" and first.finish_reason == "stop"


async def test_special_stop_token_text_stays_out_with_skip_special_tokens_false(llm, tiny_tokenizer):
    plain = await greedy(llm, "Hello", ignore_eos=True)
    at = plain.token_ids.index(IM_START)
    done = await greedy(llm, "Hello", stop_token_ids=[IM_START], skip_special_tokens=False)
    assert done.token_ids == plain.token_ids[: at + 1]
    assert "<|im_start|>" not in done.text
    assert done.text == tiny_tokenizer.decode(plain.token_ids[:at])


# -- skip_special_tokens, include_stop_str_in_output ---------------------------------------------------------


async def test_skip_special_tokens_false_shows_special_tokens(llm, tiny_tokenizer):
    skipped = await greedy(llm, "Hello", max_tokens=8, ignore_eos=True)
    shown = await greedy(llm, "Hello", max_tokens=8, ignore_eos=True, skip_special_tokens=False)
    assert IM_START in skipped.token_ids and shown.token_ids == skipped.token_ids
    assert "<|im_start|>" not in skipped.text
    assert shown.text.count("<|im_start|>") == skipped.token_ids.count(IM_START)
    assert shown.text == tiny_tokenizer.decode(shown.token_ids, skip_special_tokens=False)
    assert shown.text.replace("<|im_start|>", "") == skipped.text


async def test_special_token_text_can_be_a_stop_string_only_when_shown(llm, tiny_tokenizer):
    plain = await greedy(llm, "Hello", ignore_eos=True)
    at = plain.token_ids.index(IM_START)
    shown = await greedy(llm, "Hello", stop="<|im_start|>", skip_special_tokens=False)
    assert shown.token_ids == plain.token_ids[: at + 1] and shown.finish_reason == "stop"
    assert shown.text == tiny_tokenizer.decode(plain.token_ids[:at])
    kept = await greedy(llm, "Hello", stop="<|im_start|>", skip_special_tokens=False, include_stop_str_in_output=True)
    assert kept.text == shown.text + "<|im_start|>"
    hidden = await greedy(llm, "Hello", stop="<|im_start|>", ignore_eos=True)  # skipped text never matches
    assert hidden.token_ids == plain.token_ids and hidden.finish_reason == "length"


async def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    plain = await greedy(llm, CODE, ignore_eos=True)
    assert plain.text.startswith("J bickcaca")
    cut = await greedy(llm, CODE, stop="kca")
    kept = await greedy(llm, CODE, stop="kca", include_stop_str_in_output=True)
    assert cut.text == "J bic" and cut.finish_reason == "stop"
    assert kept.text == "J bickca" and kept.finish_reason == "stop"
    assert kept.token_ids == cut.token_ids == plain.token_ids[:4]
    with anyio.fail_after(30):
        deltas = [d async for d in llm.astream(CODE, chat_template=False, stop="kca", include_stop_str_in_output=True)]
    assert "".join(deltas) == "J bickca"


# -- min_tokens ----------------------------------------------------------------------------------------------


async def test_min_tokens_masks_eos_until_reached(llm, tiny_model):
    # A +100 bias makes eos the greedy choice at every step: the request ends right after min_tokens.
    eager = await greedy(llm, CODE, logit_bias={EOS: 100}, skip_special_tokens=False)
    assert eager.token_ids == [EOS] and eager.text == "" and eager.finish_reason == "stop"
    held = await greedy(llm, CODE, logit_bias={EOS: 100}, min_tokens=5, skip_special_tokens=False)
    expected = greedy_with(tiny_model, held.prompt_token_ids, 5, ban(lambda out: [EOS]))
    assert held.token_ids == [*expected, EOS]
    assert held.finish_reason == "stop" and "<|im_end|>" not in held.text


async def test_min_tokens_equal_to_max_tokens_never_ends_early(llm):
    done = await greedy(llm, CODE, max_tokens=4, min_tokens=4, logit_bias={EOS: 100})
    assert len(done.token_ids) == 4 and EOS not in done.token_ids
    assert done.finish_reason == "length"


async def test_min_tokens_masks_stop_token_ids(llm, tiny_model):
    done = await greedy(llm, CODE, max_tokens=16, stop_token_ids=[264], min_tokens=6)
    expected = greedy_with(
        tiny_model,
        done.prompt_token_ids,
        16,
        ban(lambda out: [264, EOS] if len(out) < 6 else []),
        end_ids=frozenset({264, EOS}),
    )
    assert done.token_ids == expected
    assert 264 not in done.token_ids[:6] and len(done.token_ids) > 6


# -- logit_bias ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [67, "67"])
async def test_logit_bias_of_100_forces_a_token(llm, key):
    done = await greedy(llm, CODE, max_tokens=5, logit_bias={key: 100})
    assert done.token_ids == [67] * 5 and done.text == "aaaaa"


async def test_logit_bias_is_added_to_the_logits(llm, tiny_model):
    plain = await greedy(llm, CODE, ignore_eos=True)
    bias = {plain.token_ids[0]: -100, plain.token_ids[1]: -2.5, 67: 3.0}
    done = await greedy(llm, CODE, ignore_eos=True, logit_bias={str(k): v for k, v in bias.items()})

    def add(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token, value in bias.items():
            logits[token] += value
        return logits

    assert done.token_ids == greedy_with(tiny_model, done.prompt_token_ids, 12, add)
    assert done.token_ids[0] != plain.token_ids[0]


# -- bad_words -----------------------------------------------------------------------------------------------


async def test_single_token_bad_word_is_never_generated(llm, tiny_model, tiny_tokenizer):
    ids = {w: tiny_tokenizer(w, add_special_tokens=False).input_ids for w in ("ca", " ca")}
    assert ids == {"ca": [264], " ca": [269]}  # one token each: both banned at every step
    done = await greedy(llm, CODE, max_tokens=16, ignore_eos=True, bad_words=["ca"])
    assert 264 not in done.token_ids and 269 not in done.token_ids
    assert done.token_ids == greedy_with(tiny_model, done.prompt_token_ids, 16, ban(lambda out: [264, 269]))


async def test_multi_token_bad_word_bans_its_last_token_after_its_prefix(llm, tiny_model, tiny_tokenizer):
    # "bick" reads [68 'b', 320 'ick'] alone and [288 ' b', 320 'ick'] after a space; greedy generates
    # 288 then 320, so 320 is banned at that step (and only after 68 or 288).
    assert tiny_tokenizer("bick", add_special_tokens=False).input_ids == [68, 320]
    assert tiny_tokenizer(" bick", add_special_tokens=False).input_ids == [288, 320]
    done = await greedy(llm, CODE, max_tokens=16, ignore_eos=True, bad_words=["bick"])
    expected = greedy_with(
        tiny_model, done.prompt_token_ids, 16, ban(lambda out: [320] if out and out[-1] in (68, 288) else [])
    )
    assert done.token_ids == expected
    assert done.token_ids[:2] == [44, 288] and done.token_ids[2] != 320
    assert "bick" not in done.text


# -- allowed_token_ids ---------------------------------------------------------------------------------------


async def test_allowed_token_ids_restrict_the_output(llm, tiny_model):
    plain = await greedy(llm, CODE, ignore_eos=True)
    allowed = sorted({plain.token_ids[1], plain.token_ids[3], 67, 18, 350})
    done = await greedy(llm, CODE, ignore_eos=True, allowed_token_ids=allowed)
    assert set(done.token_ids) <= set(allowed)

    def only(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    assert done.token_ids == greedy_with(tiny_model, done.prompt_token_ids, 12, only)
    single = await greedy(llm, CODE, max_tokens=4, allowed_token_ids=[350])
    assert single.token_ids == [350] * 4


async def test_controls_that_exclude_every_token_fail_only_that_request(llm):
    # Only eos is allowed, and min_tokens masks it: no token is left at the first step.
    with pytest.raises(GenerationError):
        await greedy(llm, CODE, allowed_token_ids=[EOS], min_tokens=2)
    again = await greedy(llm, CODE, max_tokens=3, allowed_token_ids=[EOS])
    assert again.token_ids == [EOS] and again.finish_reason == "stop"


async def test_controlled_rows_leave_plain_rows_in_the_batch_alone(llm, tiny_model):
    calls = [
        {"prompt": CODE, "ignore_eos": True},
        {"prompt": "Hello", "ignore_eos": True, "logit_bias": {67: 100}},
        {"prompt": "The quick brown fox", "ignore_eos": True, "allowed_token_ids": [18, 67]},
        {"prompt": CODE, "ignore_eos": True, "bad_words": ["ca"], "min_tokens": 3},
        {"prompt": "Hello", "ignore_eos": True},
    ]
    plain_a, forced, allowed, banned, plain_b = await run_admitted_together(llm, calls)
    for plain in (plain_a, plain_b):
        assert plain.token_ids == reference_ids(tiny_model, plain.prompt_token_ids, 12)
    assert forced.token_ids == [67] * 12
    assert set(allowed.token_ids) <= {18, 67}
    assert banned.token_ids == greedy_with(tiny_model, banned.prompt_token_ids, 12, ban(lambda out: [264, 269]))


# -- logits processors ---------------------------------------------------------------------------------------


async def test_two_argument_processor_shapes_every_token(llm):
    def force_a(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[67 if len(output_ids) % 2 == 0 else 18] = 0.0
        return forced

    done = await greedy(llm, CODE, max_tokens=5, logits_processors=[force_a])
    assert done.token_ids == [67, 18, 67, 18, 67] and done.text == "a0a0a"


async def test_three_argument_processor_sees_prompt_and_output_on_the_engine_thread(llm):
    seen: list[tuple[list[int], list[int], int, str]] = []

    def record(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append((list(prompt_ids), list(output_ids), logits.shape[-1], threading.current_thread().name))
        return logits

    plain = await greedy(llm, CODE, max_tokens=5, ignore_eos=True)
    done = await greedy(llm, CODE, max_tokens=5, ignore_eos=True, logits_processors=[record])
    assert done.token_ids == plain.token_ids  # returning the logits unchanged changes nothing
    assert [out for _, out, _, _ in seen] == [done.token_ids[:i] for i in range(5)]
    assert all(p == done.prompt_token_ids for p, _, _, _ in seen)
    assert all(width == llm.engine.vocab_size for _, _, width, _ in seen)
    assert all(name.startswith("async-llm-engine") for _, _, _, name in seen)


@pytest.mark.parametrize("fail_at", [0, 2])  # the first token (sampled with the prefill) or a decode step
async def test_raising_processor_leaves_concurrent_requests_exact(llm, tiny_model, fail_at):
    def explode(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == fail_at:
            raise RuntimeError("processor exploded")
        return logits

    gate = threading.Event()
    llm.engine.call_when_idle(gate.wait)
    try:
        tasks = [
            asyncio.ensure_future(greedy(llm, CODE, ignore_eos=True)),
            asyncio.ensure_future(greedy(llm, "Hello", ignore_eos=True, logits_processors=[explode])),
            asyncio.ensure_future(greedy(llm, "The quick brown fox", ignore_eos=True)),
        ]
        await asyncio.sleep(0)
    finally:
        gate.set()
    with anyio.fail_after(30):
        first, failed, last = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(failed, GenerationError) and isinstance(failed.__cause__, RuntimeError)
    for c in (first, last):
        assert c.token_ids == reference_ids(tiny_model, c.prompt_token_ids, 12)
    after = await greedy(llm, "Hello", ignore_eos=True)  # the engine keeps serving
    assert after.token_ids == reference_ids(tiny_model, after.prompt_token_ids, 12)
    assert llm.stats()["num_failed"] == 1 and llm.stats()["num_finished"] == 3


@pytest.mark.parametrize(
    "bad_return", [lambda logits: None, lambda logits: logits[:-1], lambda logits: logits.tolist()], ids=repr
)
async def test_processor_returning_no_row_of_logits_fails_its_request(llm, bad_return):
    def processor(output_ids: list[int], logits: torch.Tensor):
        return bad_return(logits)

    with pytest.raises(GenerationError) as info:
        await greedy(llm, CODE, logits_processors=[processor])
    assert isinstance(info.value.__cause__, TypeError)
    assert (await greedy(llm, CODE, max_tokens=2)).finish_reason == "length"


# -- validation ----------------------------------------------------------------------------------------------


BAD_CONTROLS = [
    ({"top_logprobs": 2}, InvalidParameterError, "top_logprobs"),  # without logprobs=True
    ({"logprobs": True, "top_logprobs": 21}, InvalidParameterError, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, InvalidParameterError, "top_logprobs"),
    ({"logprobs": "yes"}, ParameterTypeError, "logprobs"),
    ({"prompt_logprobs": 21}, InvalidParameterError, "prompt_logprobs"),
    ({"prompt_logprobs": 1.5}, ParameterTypeError, "prompt_logprobs"),
    ({"min_tokens": 25}, InvalidParameterError, "min_tokens"),  # the fixture's max_tokens is 24
    ({"min_tokens": 6, "max_tokens": 5}, InvalidParameterError, "min_tokens"),
    ({"min_tokens": -1}, InvalidParameterError, "min_tokens"),
    ({"logit_bias": {5: 100.5}}, InvalidParameterError, "logit_bias"),
    ({"logit_bias": {5: -101}}, InvalidParameterError, "logit_bias"),
    ({"logit_bias": {"five": 1}}, InvalidParameterError, "logit_bias"),
    ({"logit_bias": {-3: 1}}, InvalidParameterError, "logit_bias"),
    ({"logit_bias": {5: "high"}}, ParameterTypeError, "logit_bias"),
    ({"logit_bias": 5}, ParameterTypeError, "logit_bias"),
    ({"allowed_token_ids": []}, InvalidParameterError, "allowed_token_ids"),
    ({"allowed_token_ids": [3, -1]}, InvalidParameterError, "allowed_token_ids"),
    ({"allowed_token_ids": "abc"}, ParameterTypeError, "allowed_token_ids"),
    ({"stop_token_ids": [-1]}, InvalidParameterError, "stop_token_ids"),
    ({"stop_token_ids": [2.0]}, ParameterTypeError, "stop_token_ids"),
    ({"bad_words": "word"}, ParameterTypeError, "bad_words"),
    ({"bad_words": [""]}, ParameterTypeError, "bad_words"),
    ({"logits_processors": [1]}, ParameterTypeError, "logits_processors"),
    ({"logits_processors": lambda ids, logits: logits}, ParameterTypeError, "logits_processors"),
    ({"skip_special_tokens": 0}, ParameterTypeError, "skip_special_tokens"),
    ({"include_stop_str_in_output": "no"}, ParameterTypeError, "include_stop_str_in_output"),
    ({"logprobs": True, "num_beams": 2}, InvalidParameterError, "logprobs"),
]


@pytest.mark.parametrize(("kwargs", "error", "param"), BAD_CONTROLS, ids=[str(k) for k, _, _ in BAD_CONTROLS])
async def test_bad_control_is_refused_before_queueing(llm, kwargs, error, param):
    for call in (llm.acomplete, llm.arun, llm.submit):
        with pytest.raises(error) as info:
            await call("Hello", **kwargs)
        assert isinstance(info.value, ParameterError) and info.value.param == param
    with pytest.raises(error):
        llm.astream("Hello", **kwargs)
    assert_nothing_queued(llm)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"stop_token_ids": [5, 400]}, "stop_token_ids"),
        ({"allowed_token_ids": [3, 10**6]}, "allowed_token_ids"),
        ({"logit_bias": {400: 1.0}}, "logit_bias"),
        ({"logit_bias": {"400": -1}}, "logit_bias"),
    ],
)
async def test_ids_beyond_the_vocabulary_are_refused(llm, kwargs, param):
    assert llm.engine.vocab_size == 400
    with pytest.raises(InvalidParameterError) as info:
        await llm.acomplete("Hello", **kwargs)
    assert info.value.param == param
    assert_nothing_queued(llm)
    ok = {name: [399] if name != "logit_bias" else {399: 1.0} for name in kwargs}  # the last id is fine
    assert (await greedy(llm, "Hello", max_tokens=2, **ok)).finish_reason in ("stop", "length")
