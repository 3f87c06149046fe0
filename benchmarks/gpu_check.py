"""The GPU check: today's engine against plain transformers on one CUDA card, in one short run.

    python benchmarks/gpu_check.py --out DIR [--tiny] [--bursts 1,64,256] [--new-tokens 128]
                                   [--budget-s 420]

The benchmark's random-weight Llama with Llama-3.2-1B's geometry in bf16
(:mod:`async_llm.bench.random_model`: built from a config, nothing is downloaded; ``--tiny`` builds a
small one, for a dry run on a CPU), its tokenizer made in code that every system shares, and bursts
of N requests x ``--new-tokens`` tokens (eos ignored):

- ``async_llm``: :class:`~async_llm.HuggingFaceLLM` over the model, ``max_batch_size`` = the largest
  burst (on CUDA the static runner with its decode graphs; the runner, its graphs and their capture
  time are recorded); ``async_llm_eager`` the same without graphs; ``async_llm_padded`` the fast
  runner over the padded batch (the engine before the static runner); each also runs a mixed
  workload (64 requests, prompts of 16 to 512 tokens, 16 to 256 new tokens);
- ``static``: one padded ``model.generate`` of the whole burst;
- ``transformers_cb``: transformers' continuous batching (``generate_batch``), where this version
  has it, in its default setting and (``transformers_cb_graphs``) with its CUDA graphs on;
- ``floor``: the weight products alone at each burst's row count (``torch.cuda`` graphs of
  ``x @ W.T`` for every linear of the model, replayed), and a device-to-device copy for the memory
  bandwidth: the physical floor of one decode step.

With ``--tests`` the CUDA tests run first (pytest must be importable). It writes
``DIR/gpu_check.json`` after every measurement (a run cut short keeps what it measured)
and prints a table last. Systems and bursts that would not fit in ``--budget-s`` are skipped and
say so. One system's failure does not cost the others: a system that raises is recorded with its
error; one that leaves the CUDA context unusable (an illegal address, a device-side assert) or
gives no result within ``--system-limit-s`` (its threads' stacks go to ``DIR/hang_NAME.txt``) is
recorded too, and the systems after it run in a fresh process (``--only ... --resume``).

On a bare GPU machine (Python 3.12; torch, transformers, anyio and pytest there), the library's
other imports travel as wheels: ``benchmarks/gpu_wheels.sh`` downloads them into ``.whl/``, and
``benchmarks/gpu_run.sh`` installs them and runs this script with ``--tests``.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

PROMPT_TOKENS = 32  # every request's prompt, one token per character: its number, then filler
#: The static runner's slot: the longest request here (the mixed workload's 512 + 256 tokens) fits.
MAX_MODEL_LEN = 1024


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The benchmark's seeded random-weight model (``random:llama-1b``, or ``random:tiny``) on ``device``."""
    from async_llm.bench.random_model import build as build_random

    model, tokenizer = build_random("tiny" if tiny else "llama-1b", dtype)
    return model.to(device), tokenizer


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts of :data:`PROMPT_TOKENS` tokens (characters) each."""
    return [f"{i:05d}" + "abcdefghijklmnopqrstuvwxyz!"[: PROMPT_TOKENS - 5] for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def mixed_workload(n: int = 64, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` requests of mixed prompt (16 to 512 characters) and output (16 to 256 tokens) lengths."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        (f"{i:05d}" + "".join(rng.choice(letters) for _ in range(rng.randint(11, 507))), rng.randint(16, 256))
        for i in range(n)
    ]


def run_async_llm(
    results: dict[str, Any],
    model: Any,
    tokenizer: Any,
    bursts: list[int],
    new_tokens: int,
    profile: str | None = None,
    **options: Any,
) -> None:
    """Bursts through :class:`~async_llm.HuggingFaceLLM` (``options``: the engine's, e.g.
    ``cuda_graphs=False`` or ``runner="fast"``), then the mixed workload; with ``profile`` (a file
    name), one more burst of the largest size under ``torch.profiler``, its table of the most
    expensive operations written to ``DIR/profile``."""
    from async_llm import HuggingFaceLLM

    async def burst(llm: Any, calls: list[tuple[str, int]], device: torch.device) -> dict[str, Any]:
        _peak_reset(device)
        start = time.perf_counter()
        done = await asyncio.gather(
            *(llm.acomplete(t, max_tokens=k, ignore_eos=True, chat_template=False) for t, k in calls)
        )
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in done)
        tpot = [(c.latency - c.time_to_first_token) / (len(c.token_ids) - 1) for c in done if len(c.token_ids) > 1]
        return {
            "tok_s": tokens / seconds,
            "seconds": seconds,
            "ttft_p50_s": statistics.median(c.time_to_first_token for c in done),
            "tpot_p50_s": statistics.median(tpot) if tpot else None,
            "peak_gib": _peak_gib(device),
        }

    async def main() -> None:
        device = next(model.parameters()).device
        start = time.perf_counter()
        llm = HuggingFaceLLM(
            model=model,
            tokenizer=tokenizer,
            max_batch_size=max(bursts),
            prefix_cache=False,
            max_tokens=new_tokens,
            max_model_len=MAX_MODEL_LEN,
            **options,
        )
        async with llm:
            llm.engine.ready.wait()
            results["start_s"] = time.perf_counter() - start
            results["runner"] = llm.engine.runner.name
            graphs = getattr(llm.engine.runner, "graphs", None)
            results["graphs"] = len(graphs.graphs) if graphs is not None else 0
            results["capture_s"] = graphs.capture_seconds if graphs is not None else 0.0
            await llm.abatch_run(prompts(2), max_tokens=4, ignore_eos=True, chat_template=False)  # warm-up
            for n in bursts:
                results[str(n)] = await burst(llm, [(t, new_tokens) for t in prompts(n)], device)
                save()
            results["mixed"] = await burst(llm, mixed_workload(), device)
            if graphs is not None:
                results["graphs_after"] = len(graphs.graphs)
            save()
            if profile is not None and _OUT is not None:
                await _profiled(llm, prompts(max(bursts)), new_tokens, device, _OUT / profile)
                results["profile"] = profile
                save()

    asyncio.run(main())


async def _profiled(llm: Any, texts: list[str], new_tokens: int, device: torch.device, path: Path) -> None:
    """One burst under ``torch.profiler`` (the device's kernels too where CUDA is): the operations
    that took the most time, as a table, to ``path`` (what a missed target's note quotes). The
    profiler runs on the engine's thread, where the model runs: it starts with the burst's first
    step there and stops there once the engine is idle again."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    engine = llm.engine
    step = engine._step

    def profiled_step(*args: Any, **kwargs: Any) -> Any:
        if engine._step is profiled_step:  # the first step of the burst: start here, then step plainly
            engine._step = step
            prof.start()
        return step(*args, **kwargs)

    engine._step = profiled_step
    await asyncio.gather(
        *(llm.acomplete(t, max_tokens=new_tokens, ignore_eos=True, chat_template=False) for t in texts)
    )
    await asyncio.wrap_future(engine.call_when_idle(prof.stop))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    await asyncio.to_thread(path.write_text, table)


def run_static(results: dict[str, Any], model: Any, tokenizer: Any, bursts: list[int], new_tokens: int) -> None:
    device = next(model.parameters()).device
    for n in bursts:
        batch = tokenizer(prompts(n), return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            _sync(device)
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(device)
        seconds = time.perf_counter() - start
        results[str(n)] = {"tok_s": n * new_tokens / seconds, "seconds": seconds}
        save()


def _cb_graphs_kwargs() -> dict[str, Any]:
    """transformers' continuous batching with its CUDA graphs on, as this version spells it."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # type: ignore[attr-defined]
    except ImportError:
        return {"generation_config_extra": {"use_cuda_graph": True}}
    return {"continuous_batching_config": ContinuousBatchingConfig(use_cuda_graph=True)}


def run_transformers_cb(
    results: dict[str, Any], model: Any, tokenizer: Any, bursts: list[int], new_tokens: int, graphs: bool = False
) -> None:
    """transformers' continuous batching as a server runs it (``init_continuous_batching``): one
    manager, warmed up (its graphs where on) and started before the bursts, as async_llm's engine
    is, then each burst's requests added at once and their results awaited. (``generate_batch``
    builds and starts a manager per call, its paged cache and worker thread included, which is
    start-up, not generation.) Tokens are counted from the outputs, and a failed request fails
    the system. Under ``torch.no_grad``: its worker thread writes tensors made here, which
    ``inference_mode`` would make read-only to it."""
    from transformers import GenerationConfig

    if not hasattr(model, "init_continuous_batching"):
        results["skipped"] = "this transformers has no continuous batching"
        return
    device = next(model.parameters()).device
    extra: dict[str, Any] = _cb_graphs_kwargs() if graphs else {}
    config_extra = extra.pop("generation_config_extra", {})
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0, **config_extra
    )
    with torch.no_grad():
        manager = model.init_continuous_batching(generation_config=config, **extra)
        try:
            start = time.perf_counter()
            manager.warmup()
            manager.start()
            results["start_s"] = time.perf_counter() - start
            cb_config = getattr(manager, "continuous_batching_config", None) or getattr(manager, "cb_config", None)
            if cb_config is not None:
                results["use_cuda_graph"] = str(getattr(cb_config, "use_cuda_graph", None))
            for n in bursts:
                ids = [tokenizer(t).input_ids for t in prompts(n)]
                _served(manager, ids[:2], new_tokens)  # warm-up: this row count's shapes
                _peak_reset(device)
                start = time.perf_counter()
                outputs = _served(manager, ids, new_tokens)
                _sync(device)
                seconds = time.perf_counter() - start
                tokens = sum(len(o.generated_tokens) for o in outputs)
                row: dict[str, Any] = {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens}
                row["peak_gib"] = _peak_gib(device)
                ttft = _cb_ttft(outputs, start)
                if ttft is not None:
                    row["ttft_p50_s"] = ttft
                results[str(n)] = row
                save()
        finally:
            manager.stop(block=True, timeout=30)
            destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
            if callable(destroy):
                destroy()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _served(manager: Any, ids: list[list[int]], new_tokens: int, limit_s: float = 300.0) -> list[Any]:
    """Add ``ids`` to a started continuous batching manager and wait for every one's finished
    result (with timestamps); raises with the first failed request's error."""
    request_ids = manager.add_requests(inputs=ids, max_new_tokens=new_tokens, record_timestamps=True)
    finished: dict[str, Any] = {}
    deadline = time.monotonic() + limit_s
    while len(finished) < len(request_ids):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            if getattr(result, "error", None):
                raise RuntimeError(
                    f"transformers continuous batching failed request {result.request_id}: {result.error}"
                )
            finished[result.request_id] = result
        elif result is None and (not manager.is_running() or time.monotonic() > deadline):
            raise RuntimeError(f"transformers continuous batching stopped with {len(finished)} of {len(ids)} done")
    return [finished[r] for r in request_ids]


def _cb_ttft(outputs: list[Any], start: float) -> float | None:
    """The median time to first token of continuous batching's outputs, where they carry timestamps."""
    firsts = []
    for output in outputs:
        stamps = getattr(output, "timestamps", None)
        created = getattr(output, "created_time", None)
        if stamps and created is not None:
            firsts.append(stamps[0] - created)
    return statistics.median(firsts) if firsts else None


def run_floor(results: dict[str, Any], model: Any, bursts: list[int]) -> None:
    """The weight products of one decode step at each row count, graphed where CUDA is, and the
    device's copy bandwidth."""
    device = next(model.parameters()).device
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for n in bursts:
        xs = [torch.randn(n, w.shape[1], device=device, dtype=w.dtype) for w in weights]

        def products(xs: list[torch.Tensor] = xs) -> None:
            for x, w in zip(xs, weights, strict=True):
                torch.matmul(x, w.T)

        with torch.inference_mode():
            products()
            step = products
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    products()
                step = graph.replay
            _sync(device)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
        results[str(n)] = {"step_s": statistics.median(times), "steps_per_s": 1 / statistics.median(times)}
        save()
    if device.type == "cuda":
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        _sync(device)
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        _sync(device)
        results["copy_GBps"] = 2 * 10 * src.numel() / (time.perf_counter() - start) / 1e9  # read + write
    results["weight_bytes"] = sum(w.numel() * w.element_size() for w in weights)


#: The CUDA-marked tests, in groups run one after another, each in a subprocess with its share of the
#: time limit (a group cut short keeps the output it printed): the GPU's own tests first, then the
#: stress suite's fault, cancellation and bad-input tests on CUDA.
CUDA_TEST_GROUPS = (
    ("core", ["tests/test_cuda.py", "tests/test_draws.py", "tests/test_transfer.py", "tests/test_kv_budget.py"], 2 / 3),
    # The stress files with CUDA cases (the others import the server, whose packages the lent
    # machines lack).
    (
        "stress",
        ["tests/stress/test_bad_input.py", "tests/stress/test_cancellation_storm.py", "tests/stress/test_faults.py"],
        1 / 3,
    ),
)


def run_cuda_tests(results: dict[str, Any], timeout_s: float) -> None:
    """The CUDA-marked tests (:data:`CUDA_TEST_GROUPS`), each group in a subprocess with its share of
    ``timeout_s``; ``results[group]`` is its exit code and the tail of its output."""
    import subprocess

    for group, paths, share in CUDA_TEST_GROUPS:
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs", *paths]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s * share, check=False)
        except subprocess.TimeoutExpired as exc:
            printed = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            results[group] = {"rc": None, "output": f"timed out after {timeout_s * share:.0f} s: {printed[-4000:]}"}
        else:
            results[group] = {"rc": done.returncode, "output": (done.stdout + done.stderr)[-6000:]}
        save()


_REPORT: dict[str, Any] = {}
_OUT: Path | None = None


_SAVING = threading.Lock()


def save() -> None:
    """Write what was measured so far (a run cut short keeps it): whole or not at all (a temporary
    file renamed over the report), one writer at a time (the watchdog's thread writes too)."""
    if _OUT is None:
        return
    with _SAVING:
        text = json.dumps(_REPORT, indent=2, default=str)
        temporary = _OUT / "gpu_check.json.tmp"
        temporary.write_text(text)
        os.replace(temporary, _OUT / "gpu_check.json")


def _cuda_usable(device: torch.device) -> bool:
    """Whether the device still runs work after a system failed (an illegal memory access or a
    device-side assert leaves a CUDA context that fails every later call)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return bool((torch.ones(1, device=device) + 1).item() == 2)
    except Exception:  # noqa: BLE001  # any failure here means the context is gone
        return False


def _continue_fresh(args: argparse.Namespace, remaining: list[str], deadline: float) -> NoReturn:
    """Save what was measured and run ``remaining`` systems in a fresh process (this one's CUDA
    context or threads cannot be trusted any more), which reads the saved report back; this one
    exits at once, so the card's memory it holds is freed (the new one writes to the same output)."""
    try:
        save()
    except Exception as exc:  # noqa: BLE001  # a report being written elsewhere: the last one stands
        print(f"could not save the report before going on: {exc!r}", flush=True)
    if not remaining:
        os._exit(1)
    argv = [sys.executable, os.path.abspath(__file__), "--out", str(args.out), "--bursts", args.bursts]
    argv += ["--new-tokens", str(args.new_tokens), "--budget-s", f"{max(0.0, deadline - time.monotonic()):.0f}"]
    argv += ["--system-limit-s", str(args.system_limit_s), "--only", ",".join(remaining), "--resume"]
    argv += ["--tiny"] if args.tiny else []
    print(f"continuing in a fresh process with {', '.join(remaining)}", flush=True)
    sys.stderr.flush()
    import subprocess

    subprocess.Popen(argv)  # this script again, for the systems left
    os._exit(0)


def _watchdog(
    args: argparse.Namespace, name: str, results: dict[str, Any], remaining: list[str], deadline: float, limit: float
) -> threading.Timer:
    """A timer that, if ``name`` has not finished after ``limit`` seconds, records it as hung, writes
    every thread's stack to ``DIR/hang_NAME.txt`` and goes on with ``remaining`` in a fresh process."""

    def hung() -> None:
        hang = f"no result after {limit:.0f} s (stacks in hang_{name}.txt)"
        results["error"] = f"{results['error']}; then {hang}" if "error" in results else hang
        with open(args.out / f"hang_{name}.txt", "w") as file:
            faulthandler.dump_traceback(file=file, all_threads=True)
        _continue_fresh(args, remaining, deadline)

    timer = threading.Timer(limit, hung)
    timer.daemon = True
    timer.start()
    return timer


def main() -> None:
    global _OUT
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a small model (a dry run on a CPU)")
    parser.add_argument("--bursts", default="1,64,256")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--tests", action="store_true", help="run the CUDA tests first (needs pytest)")
    parser.add_argument("--tests-timeout-s", type=float, default=180.0)
    parser.add_argument("--system-limit-s", type=float, default=150.0, help="one system's longest run")
    parser.add_argument("--only", help="these systems (comma-separated), in the usual order")
    parser.add_argument("--resume", action="store_true", help="add to DIR/gpu_check.json instead of starting it")
    args = parser.parse_args()
    _OUT = args.out
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resume and (args.out / "gpu_check.json").exists():
        try:
            _REPORT.update(json.loads((args.out / "gpu_check.json").read_text()))
        except ValueError as exc:  # written by a process that was cut short: start a new report
            print(f"the saved report could not be read ({exc}); starting a new one", flush=True)
    if args.resume and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        _REPORT.setdefault("resumed_free_gib", []).append(round(free / 2**30, 1))
    deadline = time.monotonic() + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bursts = [int(b) for b in args.bursts.split(",")]
    model, tokenizer = build(args.tiny, device, dtype)
    _REPORT.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        dtype=str(dtype),
        bursts=bursts,
        new_tokens=args.new_tokens,
        model="tiny" if args.tiny else "llama-3.2-1b geometry, random weights",
    )
    # Most wanted first: a run cut short by --budget-s keeps the comparisons that matter most.
    systems = {
        "floor": lambda results: run_floor(results, model, bursts),
        "async_llm": lambda results: run_async_llm(
            results, model, tokenizer, bursts, args.new_tokens, profile="profile_async_llm.txt"
        ),
        "transformers_cb": lambda results: run_transformers_cb(results, model, tokenizer, bursts, args.new_tokens),
        "async_llm_eager": lambda results: run_async_llm(
            results, model, tokenizer, bursts, args.new_tokens, cuda_graphs=False
        ),
        "transformers_cb_graphs": lambda results: run_transformers_cb(
            results, model, tokenizer, bursts, args.new_tokens, graphs=True
        ),
        "static": lambda results: run_static(results, model, tokenizer, bursts, args.new_tokens),
        "async_llm_padded": lambda results: run_async_llm(
            results, model, tokenizer, bursts, args.new_tokens, runner="fast"
        ),
    }
    if device.type != "cuda":  # the dry run: what runs on a CPU
        systems["async_llm_eager"] = lambda results: run_async_llm(
            results, model, tokenizer, bursts, args.new_tokens, runner="static"
        )
        del systems["transformers_cb_graphs"]
    if args.only is not None:
        unknown = set(args.only.split(",")) - set(systems)
        if unknown:
            parser.error(f"--only: no system {', '.join(sorted(unknown))} (one of {', '.join(systems)})")
        systems = {name: run for name, run in systems.items() if name in args.only.split(",")}
    if args.tests:
        run_cuda_tests(_REPORT.setdefault("cuda_tests", {}), args.tests_timeout_s)
        save()
    names = list(systems)
    for index, (name, run) in enumerate(systems.items()):
        results: dict[str, Any] = {}
        _REPORT[name] = results  # filled as it runs: save() writes what is measured so far
        if time.monotonic() > deadline:
            results["skipped"] = "out of the time budget"
            continue
        start = time.monotonic()
        # A system may overrun the budget by a minute (it started inside it), never by more.
        limit = max(30.0, min(args.system_limit_s, deadline - start + 60.0))
        timer = _watchdog(args, name, results, names[index + 1 :], deadline, limit)
        try:
            run(results)
        except Exception as exc:  # noqa: BLE001  # one system's failure is a result, not the end of the run
            results["error"] = f"{type(exc).__name__}: {exc}"
        _REPORT[name + "_seconds"] = round(time.monotonic() - start, 1)
        save()
        # Still under the watchdog: checking the device waits for its queue, which a hung kernel
        # would never empty.
        if "error" in results and not _cuda_usable(device):
            timer.cancel()
            results["error"] += " (the CUDA context was unusable after it)"
            _continue_fresh(args, names[index + 1 :], deadline)
        timer.cancel()
    print(f"{_REPORT['device']} ({_REPORT['dtype']}), {args.new_tokens} new tokens per request")
    for name in (
        "async_llm",
        "async_llm_eager",
        "async_llm_padded",
        "transformers_cb",
        "transformers_cb_graphs",
        "static",
    ):
        row = _REPORT.get(name, {})
        cells = [f"{row[str(n)]['tok_s']:.0f}" if isinstance(row.get(str(n)), dict) else "-" for n in bursts]
        print(f"{name:16s} tok/s at bursts {bursts}: {' '.join(cells)}  {row.get('runner', row.get('error', ''))}")
    floor = _REPORT.get("floor", {})
    print("floor steps/s:", {n: round(floor[str(n)]["steps_per_s"]) for n in bursts if str(n) in floor})


if __name__ == "__main__":
    main()
