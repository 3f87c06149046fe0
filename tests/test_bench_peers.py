"""Peers in interpreters of their own: the JSON-lines worker protocol, and the F32 GGUF llama.cpp runs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from async_llm.bench.systems import ExternalRunner, SystemConfig
from async_llm.bench.workloads import RequestSpec

PEERS = Path(__file__).resolve().parent.parent / "async_llm" / "bench" / "peers"


class FakePeerRunner(ExternalRunner):
    """A peer whose worker script is written by the test; it runs with this Python."""

    name = "fake-peer"
    description = "a worker that answers each request with its token count of timestamps"

    def __init__(self, config: SystemConfig, script: Path) -> None:
        super().__init__(config)
        self.script = str(script)

    def python(self) -> str | None:
        return sys.executable

    def worker_config(self) -> dict[str, Any]:
        return {"step_s": 0.001}


def _worker(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {str(PEERS)!r})\nfrom _worker_io import serve\n" + textwrap.dedent(body)
    )
    return script


def test_a_peer_worker_reports_every_request_with_its_token_times(tmp_path: Path) -> None:
    script = _worker(
        tmp_path,
        """
        def load(config):
            print("the peer's own chatter goes to stderr, never into the protocol")
            def run(start, requests, done):
                for spec in sorted(requests, key=lambda r: r["arrival"]):
                    time.sleep(max(0.0, start + spec["arrival"] - time.perf_counter()))
                    times = []
                    for _ in range(spec["max_new_tokens"]):
                        time.sleep(config["step_s"])
                        times.append(time.perf_counter())
                    done(spec["index"], times)
            return run
        serve(load)
        """,
    )
    runner = FakePeerRunner(SystemConfig("unused"), script)
    runner.load()
    try:
        requests = [RequestSpec(i, 0.01 * i, "x", [1, 2, 3], 3 + i) for i in range(4)]
        finished: list[int] = []
        records, start = runner.run(requests, finished.append)
        assert sum(finished) == 4
        for request, record in zip(requests, records):
            assert record.output_tokens == request.max_new_tokens
            assert record.token_times == sorted(record.token_times)
            assert record.token_times[0] >= start + request.arrival  # one clock for both processes
        records, _ = runner.run(requests[:1], lambda n: None)  # it keeps serving
        assert records[0].output_tokens == 3
    finally:
        runner.close()
    assert runner._proc.returncode == 0


def test_a_peer_that_cannot_load_says_why(tmp_path: Path) -> None:
    script = _worker(
        tmp_path,
        """
        def load(config):
            raise ImportError("no module named 'peer'")
        serve(load)
        """,
    )
    runner = FakePeerRunner(SystemConfig("unused"), script)
    with pytest.raises(RuntimeError, match="no module named 'peer'"):
        runner.load()
    runner.close()


def test_a_peer_without_an_interpreter_is_skipped_with_the_reason() -> None:
    from async_llm.bench.systems import SYSTEMS

    for name in ("vllm-cpu", "vllm-cpu-ngram", "llama.cpp-f32", "llama.cpp-q4_1"):
        reason = SYSTEMS[name].unavailable(SystemConfig("unused"))
        assert reason is not None and "interpreter" in reason


def test_the_ngram_peer_runs_the_speculation_async_llm_ngram_runs() -> None:
    """vLLM's n-gram peer gets the speculative_config async_llm-ngram runs (vLLM's keys, which
    async_llm takes as they are); plain vllm-cpu gets none."""
    from async_llm.bench.systems import SYSTEMS
    from async_llm.engine.speculative import SpeculativeConfig

    ours = SYSTEMS["async_llm-ngram"].options["speculative_config"]  # type: ignore[attr-defined]
    peer = SYSTEMS["vllm-cpu-ngram"](SystemConfig("model")).worker_config()  # type: ignore[attr-defined]
    assert peer["speculative_config"] == ours and ours["method"] == "ngram"
    assert SpeculativeConfig.parse(ours) == SpeculativeConfig(**ours)
    assert "speculative_config" not in SYSTEMS["vllm-cpu"](SystemConfig("model")).worker_config()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_f32_gguf_holds_the_weights_async_llm_runs(tmp_path: Path) -> None:
    """llama.cpp's F32 file is the shipped Q4_1 file de-quantized: the same numbers as the model
    async_llm loads from it."""
    pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from async_llm.bench.gguf_f32 import f32_copy
    from async_llm.loading.default import default_model_path, find_default_gguf

    path = f32_copy(find_default_gguf(), tmp_path)
    assert f32_copy(find_default_gguf(), tmp_path) == path  # written once
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert all(int(t.tensor_type) == 0 for t in tensors.values())  # F32 throughout
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    embedding = tensors["token_embd.weight"]
    values = np.asarray(embedding.data).reshape(tuple(int(n) for n in reversed(embedding.shape)))
    assert np.array_equal(values, model.get_input_embeddings().weight.detach().numpy())


@pytest.mark.slow
def test_the_q8_0_gguf_is_the_same_weights_in_blocks_of_32(tmp_path: Path) -> None:
    """llama.cpp's Q8_0 file: every matrix Q8_0 (within half a step of its block's scale of the
    float32 weights async_llm loads), every vector F32, the metadata that says so."""
    pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from async_llm.bench.gguf_f32 import q8_0_copy
    from async_llm.loading.default import default_model_path, find_default_gguf

    path = q8_0_copy(find_default_gguf(), tmp_path)
    reader = GGUFReader(path)
    assert int(reader.fields["general.file_type"].contents()) == 7  # llama.cpp's MOSTLY_Q8_0
    tensors = {t.name: t for t in reader.tensors}
    kinds = {t.name: GGMLQuantizationType(int(t.tensor_type)) for t in tensors.values()}
    assert all(k == GGMLQuantizationType.Q8_0 for n, k in kinds.items() if len(tensors[n].shape) == 2)
    assert all(k == GGMLQuantizationType.F32 for n, k in kinds.items() if len(tensors[n].shape) == 1)
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    embedding = tensors["token_embd.weight"]
    values = dequantize(embedding.data, embedding.tensor_type).reshape(model.get_input_embeddings().weight.shape)
    weights = model.get_input_embeddings().weight.detach().numpy()
    block_max = np.abs(weights.reshape(-1, 32)).max(axis=1, keepdims=True)
    assert np.all(np.abs(values - weights).reshape(-1, 32) <= block_max / 127 * 0.5 + 1e-6)
