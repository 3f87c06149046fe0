"""Smoke test of the benchmark suite on the tiny model: every figure, the ratio columns, valid PNGs.

Speed is not asserted (CI machines vary); this checks that the suite runs end to end and that its
outputs have the promised shape.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from PIL import Image

from async_llm.bench import suite
from async_llm.bench.cli import main
from async_llm.bench.metrics import FIGURES
from async_llm.bench.workloads import GROUNDED_NEW_TOKENS, PromptBuilder, burst_workload, mixed_workload

SYSTEMS = ["async_llm", "transformers-static", "transformers-sequential"]


@pytest.fixture(scope="module")
def bench_out(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    code = main(
        [
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--concurrency",
            "2",
            "--new-tokens",
            "4",
            "--mixed-requests",
            "3",
            "--no-prefill-workloads",
            "--grounded",
            "0",
            "--rate",
            "50",
            "--prompt-range",
            "4,16",
            "--output-range",
            "2,6",
            "--systems",
            ",".join(["roofline", *SYSTEMS, "vllm"]),
            "--roofline-repeats",
            "1",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--no-isolate",
            "--no-progress",
            "--wait-quiet",
            "0",
            "--noisy-retries",
            "0",
        ]
    )
    assert code == 0
    return out


def test_json_has_every_figure_for_every_system(bench_out: Path) -> None:
    report = json.loads((bench_out / "results.json").read_text())
    assert set(report["results"]) == {"burst-2", "mixed"}
    for workload, by_system in report["results"].items():
        for system in SYSTEMS:
            figures = by_system[system]
            assert "skipped" not in figures, (workload, system, figures)
            for name in FIGURES:
                assert name in figures, (workload, system, name)
                if name != "peak_gpu_mib":  # None on the CPU by design
                    assert figures[name] is not None, (workload, system, name)
            assert figures["complete"], (workload, system)
            assert figures["output_tokens"] == figures["expected_output_tokens"]
            assert report["ratios_vs_async_llm"][workload][system]["output_tokens_per_s"] is not None
    burst = report["results"]["burst-2"]["async_llm"]
    assert burst["rounds"] == 2 and len(burst["spread"]["output_tokens_per_s"]) == 2  # medians of 2 rounds
    assert report["results"]["mixed"]["async_llm"]["rounds"] == 1
    assert report["roofline"]["burst-2"]["decode_step_ms"] > 0
    assert "mixed" not in report["roofline"]  # bare forwards are defined for bursts only
    assert report["systems"]["vllm"]["skipped"] or report["results"]["mixed"]["vllm"]
    assert {t["target"] for t in report["targets"]} >= {"mixed: tokens/s vs static batching"}


def test_markdown_has_ratio_columns(bench_out: Path) -> None:
    md = (bench_out / "results.md").read_text()
    for header in ("tok/s ratio", "TTFT p99 ms ratio", "ITL p50 ms ratio", "E2E p99 ms ratio", "peak RSS MiB ratio"):
        assert header in md
    assert "## Targets" in md and "## Roofline" in md
    for system in SYSTEMS:
        assert f"| {system} |" in md


def test_plots_are_valid_pngs(bench_out: Path) -> None:
    for name in ("throughput_vs_concurrency.png", "latency_vs_concurrency.png", "latency_percentiles.png"):
        with Image.open(bench_out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


def test_workloads_are_seeded_and_exact(tiny_tokenizer) -> None:
    a = mixed_workload(tiny_tokenizer, 12, rate=5.0, seed=3, prompt_range=(4, 40), output_range=(2, 30))
    b = mixed_workload(tiny_tokenizer, 12, rate=5.0, seed=3, prompt_range=(4, 40), output_range=(2, 30))
    assert a.requests == b.requests
    assert [r.arrival for r in a.requests] == sorted(r.arrival for r in a.requests)
    for r in a.requests:  # the text re-encodes to exactly the ids every system is fed
        assert tuple(tiny_tokenizer(r.text).input_ids) == r.prompt_ids
        assert 4 <= len(r.prompt_ids) <= 40 and 2 <= r.max_new_tokens <= 30
    builder = PromptBuilder(tiny_tokenizer, seed=0)
    assert all(len(builder.prompt(n, random.Random(n))[1]) == n for n in (5, 17, 64))
    burst = burst_workload(tiny_tokenizer, 5, 7)
    assert len(burst.requests) == 5 and all(r.arrival == 0 and r.max_new_tokens == 7 for r in burst.requests)


def test_bad_arguments_exit_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert main(["--model", str(tiny_model_dir), "--out", str(tmp_path), "--systems", "nope"]) == 2


def test_targets_take_the_median_of_round_by_round_ratios() -> None:
    from async_llm.bench.report import evaluate_targets

    def entry(tok_s: list[float], tpot: list[float]) -> dict:
        return {
            "output_tokens_per_s": sorted(tok_s)[1],
            "tpot_p50_ms": sorted(tpot)[1],
            "rounds": 3,
            "per_round": {"output_tokens_per_s": tok_s, "tpot_p50_ms": tpot, "ttft_p99_ms": [1.0] * 3},
        }

    # The machine slows down in round 2: both systems do; paired ratios see through it, medians do not.
    base, static = entry([100, 60, 70], [80, 130, 110]), entry([120, 50, 55], [70, 150, 120])
    roofline = {"decode_step_ms": 60, "total_s": 1.0, "per_round": {"decode_step_ms": [70, 118, 100]}}
    report = {
        "results": {"burst-16": {"async_llm": base, "transformers-static": static}},
        "roofline": {"burst-16": roofline},
    }
    targets = {t["target"]: t for t in evaluate_targets(report)}
    static_target = targets["burst N=16: tokens/s vs static batching"]
    assert static_target["measured"] == pytest.approx(60 / 50)  # rounds: 0.83, 1.2, 1.27 -> 1.2 (medians: 1.27)
    assert static_target["how"] == "median of 3 paired rounds" and static_target["met"] is True
    step = targets["burst N=16: decode step (TPOT p50) / roofline decode step"]
    assert step["measured"] == pytest.approx(130 / 118)  # rounds: 1.14, 1.102, 1.10 (best-of vs median: 1.83)
    assert step["met"] is True
    # Unpaired (one round each): the ratio of the figures themselves.
    report["results"]["burst-16"]["transformers-static"] = {"output_tokens_per_s": 35.0, "rounds": 1}
    targets = {t["target"]: t for t in evaluate_targets(report)}
    assert targets["burst N=16: tokens/s vs static batching"]["measured"] == pytest.approx(70 / 35)
    assert targets["burst N=16: tokens/s vs static batching"]["how"] == "ratio of medians"


def test_prefill_workloads_share_prefixes_as_described(tiny_tokenizer) -> None:
    from async_llm.bench.workloads import chat_workload, long_prompt_workload, shared_prefix_workload

    chat = chat_workload(tiny_tokenizer, conversations=2, turns=3, sizes=(10, 12, 6))
    turns = chat.requests
    assert [r.after for r in turns] == [None, 0, 1, None, 3, 4]
    assert [r.tag for r in turns] == ["", "", "last"] * 2
    for earlier, later in zip(turns, turns[1:]):
        if later.after == earlier.index:  # each turn resends the whole history: the previous prompt is its prefix
            assert later.prompt_ids[: len(earlier.prompt_ids)] == earlier.prompt_ids
    for r in turns:
        assert tuple(tiny_tokenizer(r.text).input_ids) == r.prompt_ids
    shared = shared_prefix_workload(tiny_tokenizer, requests=4, prefix_tokens=40).requests
    assert all(r.prompt_ids[:40] == shared[0].prompt_ids[:40] and r.arrival == 0 for r in shared)
    assert len({r.prompt_ids for r in shared}) == 4
    long = long_prompt_workload(tiny_tokenizer, streams=3, prompt_tokens=100, stream_tokens=20).requests
    assert [r.tag for r in long] == ["stream"] * 3 + ["long"] and len(long[-1].prompt_ids) == 100


def test_interference_and_last_turn_figures() -> None:
    from async_llm.bench.metrics import RequestRecord, tagged_figures

    stream = RequestRecord(0, 0.0, token_times=[0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2], tag="stream")
    long = RequestRecord(1, 0.35, token_times=[0.9, 1.0], tag="long")  # sent at 0.35, first token at 0.9
    last = RequestRecord(2, 2.0, token_times=[2.5], tag="last")
    figures = tagged_figures([stream, long, last])
    assert figures["itl_before_p50_ms"] == pytest.approx(100)  # gaps ending before 0.35: 0.1, 0.1
    # Gaps overlapping 0.35..0.9: 0.3 -> 0.4 and 0.4 -> 1.0 (p99 interpolated between 100 and 600 ms).
    assert figures["itl_during_p50_ms"] == pytest.approx(350)
    assert figures["itl_during_p99_ms"] == pytest.approx(595)
    assert figures["interference"] == pytest.approx(5.95)
    assert figures["last_turn_ttft_p50_ms"] == pytest.approx(500)


def test_prefill_workloads_run_with_and_without_the_prefix_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The chat turns go out as the previous ones finish; the cache saves prompt tokens; the targets
    of the prefix cache and chunked prefill are measured (their values are the full run's business)."""
    code = main(
        [
            "--model", str(tiny_model_dir), "--out", str(tmp_path), "--concurrency", "1", "--new-tokens", "2",
            "--mixed-requests", "0", "--grounded", "0", "--prefill-workloads", "--prefill-scale", "0.05",
            "--systems", "async_llm,async_llm-no-prefix-cache,transformers-static", "--repeats", "1",
            "--threads", "1", "--no-isolate", "--no-progress", "--wait-quiet", "0", "--noisy-retries", "0",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    results = report["results"]
    assert set(results) == {"burst-1", "chat", "shared-prefix", "long-prompt"}
    assert "transformers-static" not in results["chat"]  # the prefill workloads are for the systems with a cache
    assert "async_llm-no-prefix-cache" not in results["burst-1"]
    cached, plain = results["shared-prefix"]["async_llm"], results["shared-prefix"]["async_llm-no-prefix-cache"]
    assert cached["complete"] and plain["complete"]
    assert cached["prefill_computed_tokens"] < plain["prefill_computed_tokens"]
    assert results["chat"]["async_llm"]["prefix_cache_hit_tokens"] > 0
    assert results["chat"]["async_llm-no-prefix-cache"]["prefix_cache_hit_tokens"] == 0
    assert results["chat"]["async_llm"]["last_turn_ttft_p50_ms"] > 0
    assert results["long-prompt"]["async_llm"]["interference"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["shared-prefix: prompt tokens computed, <= 1/8 of those without the cache"]["measured"] > 1
    assert "This workload's own figures" in (tmp_path / "results.md").read_text()


def test_a_random_model_is_built_once_from_a_config_and_loads_as_a_folder(tmp_path, monkeypatch) -> None:
    """`--model random:tiny`: seeded random weights and a tokenizer made in code, written once as a
    transformers folder; prompts keep their own tokens (no shared prefix by accident)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from async_llm.bench import random_model
    from async_llm.loading import gguf

    monkeypatch.setenv(gguf.CACHE_ENV_VAR, str(tmp_path))
    folder = random_model.folder("random:tiny", "float32")
    assert folder == tmp_path / "random" / "tiny-float32" and (folder / "config.json").is_file()
    assert random_model.folder("random:tiny", "float32") == folder  # found, not built again
    model = AutoModelForCausalLM.from_pretrained(folder)
    rebuilt, _ = random_model.build("tiny", torch.float32)
    for (name, saved), (_, fresh) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(saved, fresh), name  # seeded: the same weights every time
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first, second = (tokenizer(f"Request {i}: hello").input_ids for i in (0, 1))
    assert len(first) == len("Request0:hello") and first != second and first[:7] == second[:7]
    assert tokenizer.unk_token_id not in first
    with pytest.raises(ValueError, match="unknown random model 'random:huge'"):
        random_model.folder("random:huge")


def test_bench_refuses_an_unknown_random_model(capsys) -> None:
    from async_llm.bench.cli import main

    assert main(["--model", "random:huge", "--systems", "async_llm", "--quick", "--no-progress"]) == 2
    assert "unknown random model 'random:huge'" in capsys.readouterr().err


# -- the static runner's options and the CUDA-only variant: parsing and selection, nothing timed -------------------


def _args(*argv: str):
    from async_llm.bench.cli import _resolve, build_parser

    return _resolve(build_parser().parse_args(list(argv)))


def test_the_cpu_suite_keeps_its_systems_and_dtype_and_cuda_adds_the_eager_variant() -> None:
    from async_llm.bench.cli import ALL_SYSTEMS, CPU_ONLY, NAMED_ONLY

    cpu = _args()
    assert cpu.dtype == "float32" and "async_llm-eager" not in cpu.systems
    assert cpu.systems == [s for s in ALL_SYSTEMS if s != "async_llm-eager" and s not in NAMED_ONLY]
    assert {"async_llm-int8", "async_llm-ngram", "llama.cpp-q8_0"} <= set(cpu.systems)
    named = _args("--systems", "async_llm-python-step,async_llm")
    assert named.systems == ["async_llm", "async_llm-python-step"]  # measured when named, in run order
    cuda = _args("--device", "cuda:1")  # parsing only: main() checks that torch sees the device
    assert cuda.dtype == "bfloat16" and cuda.systems == [s for s in ALL_SYSTEMS if s not in CPU_ONLY]
    assert cuda.systems.index("async_llm-eager") == cuda.systems.index("async_llm") + 3
    assert _args("--device", "cuda", "--dtype", "float32").dtype == "float32"  # a flag given wins
    assert _args("--systems", "async_llm-eager,async_llm").systems == ["async_llm", "async_llm-eager"]


def test_engine_flags_parse_as_the_main_cli_reads_them() -> None:
    args = _args("--runner", "static", "--max-model-len", "512", "--kv-cache-bytes", "1.5 GiB")
    assert (args.runner, args.max_model_len, args.kv_cache_bytes) == ("static", 512, 3 << 29)
    assert _args("--gpu-memory-utilization", "0.5").gpu_memory_utilization == 0.5
    for bad in (
        ["--gpu-memory-utilization", "0.5", "--kv-cache-bytes", "1GiB"],  # one budget or the other
        ["--gpu-memory-utilization", "1.5"],
        ["--kv-cache-bytes", "8GB"],
        ["--max-model-len", "0"],
        ["--runner", "paged"],
    ):
        with pytest.raises(SystemExit) as exc:
            _args(*bad)
        assert exc.value.code == 2, bad


def test_engine_options_size_a_slot_to_the_longest_request_where_the_static_runner_runs(tiny_tokenizer) -> None:
    from async_llm.bench.engine_args import engine_options, workload_context
    from async_llm.bench.runner import SystemConfig

    workloads = [
        burst_workload(tiny_tokenizer, 2, 7),
        mixed_workload(tiny_tokenizer, 5, rate=5.0, seed=1, prompt_range=(4, 40), output_range=(2, 30)),
    ]
    longest = max(len(r.prompt_ids) + r.max_new_tokens for w in workloads for r in w.requests)
    assert workload_context(workloads) == longest and workload_context([]) == 0
    none = dict.fromkeys(("runner", "max_model_len", "gpu_memory_utilization", "kv_cache_bytes"))
    assert engine_options(_args(), workloads) == none  # CPU: the fast runner has no slots, nothing changes
    assert engine_options(_args("--device", "cuda"), workloads) == {**none, "max_model_len": longest}
    assert engine_options(_args("--runner", "static"), workloads)["max_model_len"] == longest
    assert engine_options(_args("--device", "cuda", "--runner", "fast"), workloads)["max_model_len"] is None
    given = engine_options(_args("--device", "cuda", "--max-model-len", "4096", "--gpu-memory-utilization", "0.4"), [])
    assert given == {**none, "max_model_len": 4096, "gpu_memory_utilization": 0.4}
    # Only the options set reach HuggingFaceLLM: none set, the library picks for the device.
    assert SystemConfig("m").engine_options() == {}
    assert SystemConfig("m", **given).engine_options() == {"max_model_len": 4096, "gpu_memory_utilization": 0.4}


def test_the_async_llm_systems_pass_the_engine_options_and_their_own(monkeypatch) -> None:
    import types

    import async_llm
    from async_llm.bench.async_llm_runner import AsyncLLMEagerRunner, AsyncLLMRunner
    from async_llm.bench.runner import SystemConfig

    calls: list[dict] = []

    class FakeLLM:
        def __init__(self, model_id: str, **kwargs: object) -> None:
            calls.append({"model_id": model_id, **kwargs})
            self.engine = types.SimpleNamespace(runner=types.SimpleNamespace(name=runner_name))

        def close(self) -> None:
            pass

    monkeypatch.setattr(async_llm, "HuggingFaceLLM", FakeLLM)
    runner_name = "static"
    config = SystemConfig("folder", device="cuda", dtype="bfloat16", max_batch_size=8, max_model_len=640)
    AsyncLLMRunner(config).load()
    AsyncLLMEagerRunner(config).load()
    plain, eager = calls
    assert plain["max_model_len"] == eager["max_model_len"] == 640 and plain["max_batch_size"] == 8
    assert "cuda_graphs" not in plain and "runner" not in plain  # the engine's default runner for the device
    assert eager["cuda_graphs"] is False
    runner_name = "transformers"  # a model the static runner does not serve: no graphs to turn off
    with pytest.raises(RuntimeError, match="no decode graphs to turn off"):
        AsyncLLMEagerRunner(config).load()


def test_the_eager_variant_is_skipped_with_a_reason_off_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    from async_llm.bench.async_llm_runner import AsyncLLMEagerRunner
    from async_llm.bench.runner import SystemConfig

    assert "no CUDA graphs" in AsyncLLMEagerRunner.unavailable(SystemConfig("m", device="cpu"))
    assert "--runner fast" in AsyncLLMEagerRunner.unavailable(SystemConfig("m", device="cuda", runner="fast"))
    assert AsyncLLMEagerRunner.unavailable(SystemConfig("m", device="cuda")) is None
    assert AsyncLLMEagerRunner.unavailable(SystemConfig("m", device="cuda:0", runner="static")) is None
    # Named on a CPU: the run goes on and reports why it did not measure it (nothing is loaded or timed).
    code = main(
        [
            "--model", str(tiny_model_dir), "--out", str(tmp_path), "--concurrency", "1", "--new-tokens", "2",
            "--mixed-requests", "0", "--no-prefill-workloads", "--systems", "async_llm-eager", "--no-isolate",
            "--no-progress", "--wait-quiet", "0", "--noisy-retries", "0",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    why = report["systems"]["async_llm-eager"]["skipped"]
    assert "no CUDA graphs to turn off on cpu" in why
    assert report["results"]["burst-1"]["async_llm-eager"] == {"skipped": why}
    assert report["meta"]["async_llm_engine"] == {} and report["meta"]["dtype"] == "float32"


def test_the_async_llm_system_loads_the_static_runner_with_a_slot_of_the_given_length(tiny_model_dir: Path) -> None:
    """``--runner static`` on a CPU: the static runner, eagerly, with slots of ``max_model_len``. The
    store's budget is given (``kv_cache_bytes``): derived from the system's memory, it would depend on
    what else the machine runs."""
    from async_llm.bench.async_llm_runner import AsyncLLMRunner
    from async_llm.bench.runner import SystemConfig

    config = SystemConfig(
        str(tiny_model_dir), max_batch_size=4, threads=1, runner="static", max_model_len=96, kv_cache_bytes=64 << 20
    )
    runner = AsyncLLMRunner(config)
    runner.load()
    try:
        assert runner.llm.engine.ready.wait(60)
        assert runner.llm.engine.runner.name == "static"
        assert runner.llm.engine.max_context == 96 and runner.llm.engine.scheduler.max_batch_size == 4
        assert runner.llm.engine.runner.graphs is None  # no CUDA: no graphs
    finally:
        runner.close()


def test_the_grounded_workload_and_the_opt_in_systems(tiny_model_dir: Path, tmp_path: Path) -> None:
    """int8 and n-gram speculation as systems of their own, on a burst and on the grounded workload
    (answers that copy their prompt), with their targets reported."""
    code = main(
        [
            "--model", str(tiny_model_dir), "--out", str(tmp_path), "--concurrency", "1", "--new-tokens", "4",
            "--grounded", "1", "--mixed-requests", "0", "--no-prefill-workloads",
            "--systems", "async_llm,async_llm-int8,async_llm-ngram", "--repeats", "1", "--threads", "1",
            "--no-isolate", "--no-progress", "--wait-quiet", "0", "--noisy-retries", "0",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    grounded = report["results"]["grounded-1"]
    for system in ("async_llm", "async_llm-int8", "async_llm-ngram"):
        assert grounded[system]["complete"] and grounded[system]["output_tokens"] == GROUNDED_NEW_TOKENS
    assert report["workloads"][1]["name"] == "grounded-1" and report["workloads"][1]["kind"] == "grounded"
    labels = {t["target"] for t in report["targets"]}
    assert {"ngram grounded N=1: tokens/s vs without", "int8 burst N=1: tokens/s vs llama.cpp Q8_0"} <= labels


def test_an_idle_systems_processes_count_as_another_load_for_the_one_that_runs() -> None:
    """A system's process that spins while another system runs (as vLLM's workers poll their queues
    for a second after their last step) is a load on the machine for the system that runs: the wait
    for a quiet machine sees it, and the running system's own CPU does not include it."""
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        workers = {}
        for name, process in (("idle peer", spinning), ("running", sleeping)):
            worker = suite._ProcessWorker.__new__(suite._ProcessWorker)
            worker.process = psutil.Process(process.pid)
            workers[name] = worker
        options = suite.SuiteOptions(quiet_wait_s=0.0)
        assert suite._wait_quiet(workers, "running", options) > 0.2  # the spinning peer is another load
        before = suite._own_cpu(workers, "idle peer")
        running_before = suite._own_cpu(workers, "running")
        time.sleep(0.5)
        assert suite._own_cpu(workers, "idle peer") - before > 0.1  # its own spinning, when it is the one running
        assert suite._own_cpu(workers, "running") - running_before < 0.1
    finally:
        for process in (spinning, sleeping):
            process.kill()
            process.wait()
