"""Code written against the two seed documents runs unchanged.

The documents: the swarm_models ``BaseLLM`` documentation (kyegomez/swarms,
``docs/swarms/models/base_llm.md``, with its source ``swarm_models/base_llm.py``) and the Zeta
``HuggingFaceLLM`` documentation (``docs/swarms/models/hf.md``, also in the omni_bot space at
4962437). Their usage examples are kept below verbatim, run with ``exec``: only the import line
is adapted, and a hub id is replaced by the tiny model folder (this machine has no network).
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from async_llm import BaseLLM, HuggingFaceLLM, InvalidParameterError, ParameterTypeError, SamplingParams
from async_llm.llm.chat import TRANSCRIPT_STOP, render_transcript
from async_llm.loading.loading import UnsupportedConfigurationError
from async_llm.serve.errors import from_exception

# docs/swarms/models/base_llm.md, "4. Usage Examples", verbatim.
BASE_LLM_EXAMPLE = """\
# Import the BaseLLM class
from swarm_models import BaseLLM

# Create an instance of the language model
language_model = BaseLLM(
    model_name="my_language_model",
    max_tokens=50,
    temperature=0.7,
    top_k=50,
    top_p=0.9,
    device="cuda",
)

# Generate text for a task
task = "Translate the following English text to French: 'Hello, world.'"
generated_text = language_model.run(task)

# Print the generated text
print(generated_text)
"""

# docs/swarms/models/hf.md, "Initialization" and "Generation", verbatim.
HF_INIT_EXAMPLE = """\
llm = HuggingFaceLLM(model_id="gpt2-medium")
"""
HF_USAGE_EXAMPLE = """\
from swarms import HuggingFaceLLM

# Initialize
llm = HuggingFaceLLM(model_id="gpt2-medium")

# Generate text using __call__ method
result = llm("Once upon a time,")
print(result)

# Alternatively, using the generate method
result = llm.generate("The future of AI is")
print(result)
"""

# The constructor table of base_llm.md, every parameter at its documented default (None).
BASE_LLM_TABLE = [
    "model_name", "max_tokens", "temperature", "top_k", "top_p", "system_prompt", "beam_width",
    "num_return_sequences", "seed", "frequency_penalty", "presence_penalty", "stop_token",
    "length_penalty", "role", "max_length", "do_sample", "early_stopping", "num_beams",
    "repition_penalty", "pad_token_id", "eos_token_id", "bos_token_id", "device",
]  # fmt: skip
# base_llm.md, "Methods" (and the source's measuring methods).
BASE_LLM_METHODS = [
    "run", "arun", "batch_run", "abatch_run", "chat", "__call__", "_tokens_per_second", "_num_tokens",
    "_time_for_generation", "generate_summary", "set_temperature", "set_max_tokens", "clear_history",
    "enable_logging", "log_event", "save_checkpoint", "load_checkpoint", "toggle_creative_mode",
    "track_resource_utilization", "get_generation_time", "set_max_length", "set_model_name",
    "set_frequency_penalty", "set_presence_penalty", "set_stop_token", "set_length_penalty", "set_role",
    "set_top_k", "set_top_p", "set_num_beams", "set_do_sample", "set_early_stopping", "set_seed",
    "set_device", "metrics", "time_to_first_token", "generation_latency", "throughput", "_sec_to_first_token",
]  # fmt: skip


def adapt(source: str, old_import: str, new_import: str, model_dir: Path | None = None) -> str:
    """The document's code with its import line adapted (and the hub id made the local folder)."""
    assert source.count(old_import) == 1
    source = source.replace(old_import, new_import)
    if model_dir is not None:
        source = source.replace('"gpt2-medium"', repr(str(model_dir)))
    return source


class Translator(BaseLLM):
    """The document's "hypothetical language model": a wrapper over some other model (a phrase
    book here) that implements only a synchronous ``run``, as base_llm.md says subclasses do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, dict[str, Any], str]] = []

    def run(self, task: Any = None, *args: Any, **kwargs: Any) -> str:
        self.calls.append((task, kwargs, threading.current_thread().name))
        if "French" in task:
            return "Bonjour, le monde."
        # A chat arrives as a transcript; a base model would go on with the user's next turn.
        return "Sure thing.\nUser: and now something else" if task.endswith("Assistant:") else f"echo {task}"


class WordStreamer(BaseLLM):
    """An async-first subclass: implements only ``astream`` (echoes the prompt's words)."""

    def astream(self, prompt: Any, **overrides: Any) -> AsyncIterator[str]:
        params = self.validate(**overrides)  # the instance's settings with this call's

        async def words() -> AsyncIterator[str]:
            for word in str(prompt).split()[: params.max_tokens]:
                yield word + " "

        return words()


@pytest.fixture
def translator():
    with Translator(model_name="phrase-book", system_prompt="Translate.") as llm:
        yield llm


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model folder with a 64-token context: the examples set no max_tokens, so each
    answer is what fits after its prompt (a few dozen tokens, not the default 256)."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    model = copy.deepcopy(tiny_model)
    model.config.max_position_embeddings = 64
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_template_tokenizer(tiny_tokenizer):
    """The tiny tokenizer as a base model's (GPT-2's) is: without a chat template."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


# -- the documents' examples, verbatim ------------------------------------------------------------------
def test_base_llm_example_runs_with_a_model_that_implements_run(capsys):
    namespace: dict[str, Any] = {}
    imports = ("from swarm_models import BaseLLM", "from test_seed_documents import Translator as BaseLLM")
    exec(adapt(BASE_LLM_EXAMPLE, *imports), namespace)
    assert capsys.readouterr().out == "Bonjour, le monde.\n"
    model = namespace["language_model"]
    assert (model.model_name, model.device, model.max_tokens, model.temperature, model.top_k) == (
        "my_language_model", "cuda", 50, 0.7, 50,
    )  # fmt: skip
    model.close()


def test_base_llm_itself_is_an_interface():
    # As written, the example instantiates the interface itself (its source marks run abstract).
    source = adapt(BASE_LLM_EXAMPLE, "from swarm_models import BaseLLM", "from async_llm import BaseLLM")
    with pytest.raises(TypeError, match="BaseLLM implements neither astream .* nor run"):
        exec(source, {})

    class Nothing(BaseLLM):
        pass

    with pytest.raises(TypeError, match="Nothing implements neither"):
        Nothing()


def test_zeta_examples_run(short_context_dir, capsys):
    namespace: dict[str, Any] = {}
    imports = ("from swarms import HuggingFaceLLM", "from async_llm import HuggingFaceLLM")
    exec(adapt(HF_USAGE_EXAMPLE, *imports, short_context_dir), namespace)
    llm = namespace["llm"]
    assert capsys.readouterr().out.endswith(f"\n{namespace['result']}\n") and namespace["result"]
    assert llm.model_id == str(short_context_dir) and llm.metrics()["requests"] == 2
    assert llm.metrics()["prompt_tokens"] + llm.metrics()["output_tokens"] <= 2 * 64
    llm.close()
    namespace = {"HuggingFaceLLM": HuggingFaceLLM}
    exec(HF_INIT_EXAMPLE.replace('"gpt2-medium"', repr(str(short_context_dir))), namespace)
    namespace["llm"].close()


def test_the_model_pages_spellings(tiny_model_dir):
    # swarms' model pages: `HuggingFaceLLM(model_id="gpt2", device="cpu", max_length=50)`,
    # `generate(prompt_text: str, max_length: int = None)`, swarm_models' `run(prompt)`, Zeta's `generate_text`.
    with HuggingFaceLLM(model_id=str(tiny_model_dir), device="cpu", max_length=50) as huggingface:
        prompt = "Once upon a time"
        text = huggingface.generate(prompt)
        assert text == huggingface.generate(prompt_text=prompt) == huggingface.generate_text(prompt_text=prompt)
        assert text == huggingface.run(prompt) == huggingface(prompt)
        done = huggingface._call_sync(huggingface.acomplete, prompt)
        assert done.text == text and len(done.prompt_token_ids) + len(done.token_ids) <= 50
        short = huggingface.generate(prompt_text=prompt, max_length=len(huggingface.encode(prompt)) + 2)
        assert short == huggingface.run(prompt, max_tokens=2)


def test_every_documented_name_exists(sync_llm):
    for name in BASE_LLM_TABLE + ["history", "model_id", "start_time", "end_time"]:
        getattr(sync_llm, name)
    for name in BASE_LLM_METHODS + ["generate", "generate_text"]:
        assert callable(getattr(sync_llm, name)), name


# -- 1. task / tasks, and *args -------------------------------------------------------------------------
async def test_task_and_tasks_bind_as_documented(llm):
    expected = await llm.arun("Hello")
    assert await llm.arun(task="Hello") == await llm.arun(prompt="Hello") == expected
    assert await llm.abatch_run(tasks=["Hello", "Hi"]) == await llm.abatch_run(prompts=["Hello", "Hi"])
    assert (await llm.abatch_run(["Hello"]))[0] == expected
    for method, first in [(HuggingFaceLLM.run, "task"), (HuggingFaceLLM.batch_run, "tasks")]:
        params = list(inspect.signature(method).parameters.values())
        assert params[1].name == first and params[2].kind is inspect.Parameter.VAR_POSITIONAL


def test_sync_forms_bind_as_documented(sync_llm):
    expected = sync_llm.run("Hello")
    assert sync_llm.run(task="Hello") == sync_llm(task="Hello") == sync_llm("Hello") == expected
    assert sync_llm.batch_run(tasks=["Hello"]) == sync_llm.batch_run(["Hello"]) == [expected]


def test_extra_positional_arguments_are_refused_by_name(sync_llm):
    with pytest.raises(TypeError, match=r"run\(\) takes the prompt .* 1 extra positional argument\(s\): 'verbose'"):
        sync_llm.run("Hello", "verbose")
    with pytest.raises(TypeError, match=r"batch_run\(\) takes the tasks .*: 3"):
        sync_llm.batch_run(["Hello"], 3)
    with pytest.raises(TypeError, match="got the prompt twice, as task and prompt"):
        sync_llm.run("Hello", prompt="Bye")
    with pytest.raises(TypeError, match="needs the tasks"):
        sync_llm.batch_run()


@pytest.fixture
def sync_llm(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=6) as llm:
        yield llm


# -- 2. a subclass that implements only run (or only astream) -------------------------------------------
async def test_run_only_subclass_gets_the_async_methods(translator):
    assert await translator.arun("in French: hi") == "Bonjour, le monde."
    assert await translator.abatch_run(["a", "b"]) == ["echo a", "echo b"]
    loop_thread = threading.current_thread().name
    assert all(thread != loop_thread for _, _, thread in translator.calls)  # never on the event loop
    deltas = [d async for d in translator.astream("x")]
    assert deltas == ["echo x"]
    with pytest.raises(ValueError, match="temperature"):
        await translator.arun("x", temperature=-1)  # validated before run is called
    assert len(translator.calls) == 4
    await translator.arun("x", temperature=0.5)
    assert translator.calls[-1][1] == {"temperature": 0.5}  # handed to run as given


def test_run_only_subclass_gets_the_rest(translator, tmp_path):
    assert translator.batch_run(["a", "b"]) == ["echo a", "echo b"]
    assert all(thread != "async-llm-sync" for _, _, thread in translator.calls)  # worker threads
    assert translator("c") == "echo c"  # __call__ is run, as in swarm_models
    reply = translator.chat("Hello")
    assert reply == "Sure thing."  # cut where it starts the user's next turn
    assert translator.calls[-1][0] == "Translate.\nUser: Hello\nAssistant:"  # the transcript
    assert translator.history == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": reply}]
    metrics = translator.metrics()
    assert metrics["requests"] == 3 and metrics["output_tokens"] == 2 + 2 + 3  # words and marks
    assert translator._tokens_per_second() > 0 and translator.get_generation_time() > 0
    assert translator.end_time >= translator.start_time and abs(translator.end_time - time.time()) < 60
    ttft = translator.time_to_first_token("x")
    assert ttft == translator.get_generation_time() > 0  # no stream: the text comes all at once
    assert translator.generation_latency("x") > 0
    assert translator.throughput(["a", "b"]) > 0 and translator.metrics()["requests"] == 7
    translator.set_temperature(0.3)
    path = translator.save_checkpoint(tmp_path / "ckpt")
    with Translator() as restored:
        restored.load_checkpoint(path)
        assert restored.history == translator.history and restored.temperature == 0.3
        assert restored.system_prompt == "Translate." and restored.metrics()["requests"] == 7
    with pytest.raises(NotImplementedError, match="no weights"):
        translator.save_checkpoint(tmp_path / "w", save_weights=True)


def test_astream_only_subclass_works_too():
    with WordStreamer(max_tokens=2) as llm:
        assert llm.run("one two three") == "one two "
        assert llm.batch_run(tasks=["a b", "c"]) == ["a b ", "c "]
        assert llm.metrics()["requests"] == 3


# -- 3. the whole table, None for what is not used -------------------------------------------------------
def test_the_whole_constructor_table_with_none(tiny_model_dir):
    table = dict.fromkeys(BASE_LLM_TABLE)
    with Translator(**table) as wrapper:
        assert wrapper.sampling_defaults == SamplingParams() and wrapper.role == "user"
        assert wrapper.run("x") == "echo x" and wrapper.device is None and wrapper.model_name is None
    with HuggingFaceLLM(**{**table, "model_name": str(tiny_model_dir)}) as llm:
        assert llm.sampling_defaults == SamplingParams() and not llm.sampling_defaults.max_tokens_explicit
        assert llm.model_id == str(tiny_model_dir) and llm.max_length is None and llm.role == "user"
        assert llm.run("Hello", max_tokens=3) is not None


@pytest.mark.parametrize(
    ("alias", "name", "value", "other"),
    [
        ("beam_width", "num_beams", 2, 3),
        ("repition_penalty", "repetition_penalty", 1.1, 1.2),
        ("stop_token", "stop", "###", "@@@"),
        ("max_new_tokens", "max_tokens", 5, 6),
    ],
)
def test_a_parameter_and_its_alias(alias, name, value, other):
    for given in ({alias: None, name: value}, {alias: value, name: None}, {alias: value, name: value}):
        assert getattr(SamplingParams().merge(**given), name) == getattr(SamplingParams(**{name: value}), name)
    with pytest.raises(ParameterTypeError, match=f"{alias}=.* and {name}=|{name}=.* and {alias}="):
        SamplingParams().merge(**{alias: value, name: other})


def test_model_name_and_model_id(tiny_model_dir):
    with HuggingFaceLLM(model_id=str(tiny_model_dir), model_name=str(tiny_model_dir), max_tokens=2) as llm:
        assert llm.model_name == str(tiny_model_dir)
    with pytest.raises(ParameterTypeError, match="model_id=.* and model_name=.*not both"):
        HuggingFaceLLM(model_id=str(tiny_model_dir), model_name="other")
    with pytest.raises(ParameterTypeError, match="model_id='a' and model_name='b'"):
        Translator(model_id="a", model_name="b")


# -- 4. the Zeta constructor and generate -----------------------------------------------------------------
def test_device_and_max_length_are_positional(tiny_model_dir):
    with HuggingFaceLLM(str(tiny_model_dir), "cpu", 40) as llm:
        assert str(llm.device) == "cpu" and llm.max_length == 40
        done = llm._call_sync(llm.acomplete, "Hello", ignore_eos=True)
        assert len(done.prompt_token_ids) + len(done.token_ids) == 40


def test_quantize_true_is_4bit_nf4_with_double_quantization(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    with HuggingFaceLLM(tiny_model_dir, "cpu", quantize=True, max_tokens=4) as llm:
        config = llm.model.config.quantization_config
        assert getattr(llm.model, "is_quantized", False) and config.load_in_4bit
        assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
        assert config.bnb_4bit_compute_dtype == torch.float32  # bfloat16 on CUDA
        assert llm.run("Hello", chat_template=False, ignore_eos=True)


def test_quantize_is_checked_before_anything_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # would fail on load: the checks must come first
    with pytest.raises(InvalidParameterError, match="quantize=False contradicts quantization_config") as info:
        HuggingFaceLLM(missing, "cpu", quantize=False, quantization_config={"load_in_8bit": True})
    assert info.value.param == "quantize"
    with pytest.raises(InvalidParameterError, match="quantize=True contradicts"):
        HuggingFaceLLM(missing, "cpu", quantize=True, quantization_config={"load_in_8bit": False})
    with pytest.raises(InvalidParameterError, match="quantize must be True, False, None or one of 'int8'"):
        HuggingFaceLLM(missing, "cpu", quantize="4bit")
    with pytest.raises(ParameterTypeError, match="quantize must be True, False, 'int8' or None"):
        HuggingFaceLLM(missing, "cpu", quantize=4)
    with pytest.raises(UnsupportedConfigurationError, match="does not run on 'meta'"):
        HuggingFaceLLM(missing, "meta", quantize=True)  # the default config, checked like any other


# -- 5. chat with a base model (no chat template) ---------------------------------------------------------
async def test_chat_without_a_template_uses_a_transcript(tiny_model, no_template_tokenizer, tmp_path):
    tokenizer = no_template_tokenizer
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tokenizer, device="cpu", system_prompt="Be brief.", max_tokens=12
    ) as llm:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        text = "Be brief.\nUser: Hi\nAssistant: Hello!\nAssistant:"
        assert render_transcript(messages, "Be brief.") == text
        assert llm.encode(messages) == tokenizer(text).input_ids
        # Force the model to answer "ok", then start the user's next turn: the reply ends there.
        forced = tokenizer("ok" + TRANSCRIPT_STOP + " more", add_special_tokens=False).input_ids

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            step = min(len(output_ids), len(forced) - 1)
            biased = torch.full_like(logits, -1e9)
            biased[forced[step]] = 0.0
            return biased

        assert await llm.achat("Hi", logits_processors=[force]) == "ok"
        second = await llm.achat("And?")
        assert llm.history[-2:] == [{"role": "user", "content": "And?"}, {"role": "assistant", "content": second}]
        assert await llm.arun(llm.history[:1]) == await llm.arun(
            "Be brief.\nUser: Hi\nAssistant:", chat_template=False, stop=[TRANSCRIPT_STOP]
        )
        path = await llm.asave_checkpoint(tmp_path / "ckpt")
        llm.clear_history()
        await llm.aload_checkpoint(path)
        assert [m["content"] for m in llm.history] == ["Hi", "ok", "And?", second]


# -- 6. the measuring methods ---------------------------------------------------------------------------
def test_measurements_come_from_the_streams(sync_llm):
    before = time.time()
    ttft = sync_llm.time_to_first_token("Hello", ignore_eos=True)
    assert ttft == sync_llm._sec_to_first_token() == sync_llm.get_time_to_first_token() > 0
    assert ttft <= sync_llm.get_generation_time()  # the same request's latency
    assert sync_llm.metrics()["requests"] == 1  # one run, measured by its stream
    assert before <= sync_llm.start_time <= sync_llm.end_time <= time.time()
    assert sync_llm.end_time - sync_llm.start_time == pytest.approx(sync_llm.get_generation_time(), abs=1e-5)
    latency = sync_llm.generation_latency("Hello", ignore_eos=True)
    assert latency == sync_llm.get_generation_time() >= sync_llm.get_time_to_first_token()
    assert sync_llm._time_for_generation("Hello", ignore_eos=True) == sync_llm.get_generation_time()
    tokens_per_second = sync_llm.throughput(["a", "b", "c"], ignore_eos=True)
    assert tokens_per_second > 0 and sync_llm.metrics()["requests"] == 3 + 3  # one batch, each once
    assert sync_llm.stats()["tokens_generated"] == 6 * 6


# -- 7. top_k as a float ----------------------------------------------------------------------------------
def test_top_k_takes_a_whole_float(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, top_k=40.0) as llm:
        assert llm.top_k == 40 and isinstance(llm.top_k, int)
        llm.set_top_k(5.0)
        assert llm.top_k == 5
        with pytest.raises(InvalidParameterError, match="top_k must be a whole number, got 40.5") as info:
            llm.set_top_k(40.5)
        assert info.value.param == "top_k" and llm.top_k == 5


# -- 8. max_tokens and the context ------------------------------------------------------------------------
async def test_max_tokens_fits_the_context_unless_given(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", chat_template=False) as llm:
        prompt = "hello " * 2000
        ids = llm.encode(prompt)
        prompt = llm.tokenizer.decode(ids[: 1024 - 20])  # 20 tokens of room in the 1024-token context
        n = len(llm.encode(prompt))
        done = await llm.acomplete(prompt, ignore_eos=True)
        assert len(done.token_ids) == 1024 - n and done.finish_reason == "length"
        with pytest.raises(InvalidParameterError, match="max_tokens is 50 but the prompt is") as info:
            await llm.arun(prompt, max_tokens=50)
        error = from_exception(info.value)
        assert (info.value.param, error.status, error.param, error.code) == (
            "max_tokens", 400, "max_tokens", "context_length_exceeded",
        )  # fmt: skip
        with pytest.raises(InvalidParameterError, match="fills the model's context") as info:
            await llm.arun("hello " * 2000)
        assert info.value.param == "prompt" and from_exception(info.value).code == "context_length_exceeded"


# -- 9. asyncio only ----------------------------------------------------------------------------------------
def test_trio_gets_a_clear_error(tiny_model, tiny_tokenizer):
    trio = pytest.importorskip("trio")
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=2) as llm:

        async def one() -> None:
            await llm.arun("Hello")

        async def batch() -> None:
            await llm.abatch_run(["Hello"])

        async def stream() -> None:
            async for _ in llm.astream("Hello"):
                pass

        for main in (one, batch, stream):
            with pytest.raises(RuntimeError, match="async_llm runs on asyncio; trio is not supported"):
                trio.run(main)
        with pytest.raises(RuntimeError, match="anyio's asyncio backend works"):
            anyio.run(one, backend="trio")
        assert anyio.run(llm.arun, "Hello", backend="asyncio") == llm.run("Hello")
