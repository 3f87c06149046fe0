"""The bodies of ``async-llm demo | generate | serve``, each a coroutine of the parsed arguments that
returns the exit status. The library (torch, transformers, the server) is imported inside them, once
the arguments are known to be good."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from async_llm.cli.console import EXIT_INTERRUPTED, EXIT_RUNTIME, fail, progress
from async_llm.cli.demo_view import make_view
from async_llm.cli.parser import UsageError, deadline_defaults, engine_kwargs

__all__ = ["DEMO_PROMPTS", "demo", "generate", "serve"]

#: Prompts of the demo, deliberately varied so the answers differ in length and content.
DEMO_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences why batching requests makes language model inference faster.",
    "Give me three tips for writing readable Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a very short story about a robot that learns to paint.",
    "How do plants make their food?",
    "Translate 'good morning, how are you?' into Spanish and into French.",
)


def check_model(model: str | None) -> str:
    """Check ``--model`` before anything loads, so a wrong path fails at once in one line, and return
    what the progress line says while it loads (converting a GGUF file first, when it must)."""
    from async_llm.loading.default import DEFAULT_MODEL_NAME, find_default_gguf
    from async_llm.loading.gguf import cached_conversion
    from async_llm.loading.paths import check_model_id

    if model is None:
        name, gguf = DEFAULT_MODEL_NAME, str(find_default_gguf())  # raises the install hint if missing
    else:
        check_model_id(model)
        path = os.path.expanduser(model)
        exists = os.path.exists(path)  # else a hub id: shown as given
        name, gguf = os.path.basename(os.path.normpath(path)) if exists else model, path
    if gguf.lower().endswith(".gguf") and cached_conversion(gguf) is None:
        return f"converting {os.path.basename(gguf)} to a transformers folder (once; later runs reuse it), loading it"
    return f"loading {name}"


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling overrides the user gave, validated now so a typo fails before a slow model load.

    Raises:
        UsageError: the values are invalid (``SamplingParams`` raised ValueError/TypeError).
    """
    from async_llm import SamplingParams

    names = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        SamplingParams().merge(**kwargs)  # the same check the stream call makes, minus the model load
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid sampling parameters: {exc}") from None
    return kwargs


async def serve(args: argparse.Namespace) -> int:
    """``async-llm serve``: until SIGINT (exit status 130) or SIGTERM (0, a shutdown asked for)."""
    import anyio

    from async_llm import HuggingFaceLLM
    from async_llm.serve.server import bind_listener, serve_http, serve_ray

    if not args.ray:
        for flag, value in (("--max-replicas", args.max_replicas), ("--routing", args.routing)):
            if value is not None:
                raise UsageError(f"{flag} needs --ray")
    elif args.max_replicas is not None and args.max_replicas < args.replicas:
        raise UsageError(f"--max-replicas ({args.max_replicas}) is below --replicas ({args.replicas})")
    if args.ray:
        if args.reject_unknown_fields:
            raise UsageError("--reject-unknown-fields is not available with --ray")
        try:
            stopped_by: signal.Signals | None = await serve_ray(
                args, {**engine_kwargs(args), **deadline_defaults(args)}
            )
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("ray"):
                raise
            raise UsageError("--ray needs Ray Serve: pip install 'async-llm[ray]'") from None
    else:
        what = check_model(args.model)
        listener = bind_listener(args.host, args.port)  # a port in use fails now, not after the load
        load = functools.partial(
            HuggingFaceLLM, args.model, device=args.device, **engine_kwargs(args), **deadline_defaults(args)
        )
        try:
            with progress(what, args.verbose):
                llm = await anyio.to_thread.run_sync(load)
        except BaseException:
            listener.close()
            raise
        stopped_by = await serve_http(args, llm, listener)
    # The server has shut down cleanly whichever signal came; the status says which it was.
    if stopped_by == signal.SIGINT:
        return fail("interrupted", EXIT_INTERRUPTED)
    if stopped_by is None:
        return fail("async-llm: error: the server stopped before it started serving", EXIT_RUNTIME)
    return 0


async def batch(args: argparse.Namespace) -> int:
    """``async-llm batch``: every line of an OpenAI Batch API file; exit status 1 if any failed."""
    import anyio

    from async_llm import HuggingFaceLLM
    from async_llm.serve.batch_file import error_path_for, run_batch_file

    load = functools.partial(HuggingFaceLLM, args.model, device=args.device, **engine_kwargs(args))
    with progress(check_model(args.model), args.verbose):
        llm = await anyio.to_thread.run_sync(load)
    async with llm:
        summary = await run_batch_file(
            llm, args.input, args.output, args.error_file, window=args.window, progress=args.progress,
            model_name=args.served_model_name,
        )  # fmt: skip
    errors = args.error_file or error_path_for(Path(args.output))
    print(
        f"{summary.succeeded} succeeded, {summary.failed} failed, {summary.skipped} already done "
        f"(results: {args.output}; failures: {errors})",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


async def generate(args: argparse.Namespace) -> int:
    """``async-llm generate``: the answer streamed to stdout."""
    from async_llm import HuggingFaceLLM

    sampling = sampling_kwargs(args)
    with progress(check_model(args.model), args.verbose):
        llm = HuggingFaceLLM(
            model_id=args.model,
            device=args.device,
            system_prompt=args.system_prompt,
            **engine_kwargs(args),
        )
    out = sys.stdout
    wrote = False
    async with llm:
        try:
            async for delta in llm.astream(args.prompt, chat_template=args.chat_template, **sampling):
                out.write(delta)
                out.flush()  # per delta: the point is to see tokens as they come
                wrote = True
        except BaseException:
            if wrote:  # end the partial line so the error message starts on its own line
                out.write("\n")
                out.flush()
            raise
    out.write("\n")
    out.flush()
    return 0


async def demo(args: argparse.Namespace) -> int:
    """``async-llm demo``: several prompts streamed together, then the answers and the throughput."""
    from async_llm import HuggingFaceLLM
    from async_llm.llm.concurrency import gather

    sampling = sampling_kwargs(args)
    with progress(check_model(args.model), args.verbose):
        llm = HuggingFaceLLM(model_id=args.model, device=args.device, **engine_kwargs(args))
    out = sys.stdout
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.requests)]
    texts = [""] * len(prompts)

    async with llm:
        view = make_view(out, prompts, plain=args.plain)

        async def consume(i: int) -> None:
            async for delta in llm.astream(prompts[i], **sampling):
                texts[i] += delta
                view.on_delta(i, delta, texts)
            view.on_done(i, texts)

        start = time.perf_counter()
        try:
            # On the first failure (or Ctrl-C) the other streams stop too; closing a stream aborts it.
            await gather([functools.partial(consume, i) for i in range(len(prompts))])
        finally:
            view.close(texts)
        elapsed = time.perf_counter() - start
        stats = llm.stats()

    out.write("\nAnswers\n")
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        out.write(f"({i}) {prompt}\n{textwrap.indent(text.strip() or '(empty)', '    ')}\n")
    tokens = int(stats["tokens_generated"])
    rate = tokens / elapsed if elapsed > 0 else 0.0
    out.write(
        f"{len(prompts)} requests, {tokens} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s, "
        f"peak batch size {int(stats['peak_batch_size'])}\n"
    )
    out.flush()
    return 0
