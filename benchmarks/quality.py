"""Quality of a model in each dtype: perplexity on a fixed English text that ships with Python, and
greedy agreement with float32 over 64 tokens on the benchmark prompts.

    python benchmarks/quality.py [--model PATH] [--dtypes float32,bfloat16] [--tokens 4096]

The text is ``pydoc_data.topics`` (Python's own reference prose: the sections "assignment",
"compound", "execmodel", "exceptions", "import", in that order), cut to ``--tokens`` tokens and
scored in windows of 1024 by the model's own forward (transformers), so the figure is the dtype's
cost, whatever runner serves it. Greedy agreement runs through :class:`~async_llm.HuggingFaceLLM`
(the fast runner where it applies): the tokens each prompt's continuation shares with float32's
before they part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from typing import Any

import torch

from async_llm.bench.workloads import BURST_PROMPTS

SECTIONS = ("assignment", "compound", "execmodel", "exceptions", "import")
WINDOW = 1024


def text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[name] for name in SECTIONS)


def perplexity(model: Any, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids`` (windows of :data:`WINDOW` tokens)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW):
            window = torch.tensor([ids[start : start + WINDOW + 1]])
            logits = model(window[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
            nll, count = nll + float(loss), count + window.shape[1] - 1
    return math.exp(nll / count)


async def greedy(model_path: str | None, dtype: torch.dtype, new_tokens: int) -> tuple[str, list[list[int]]]:
    from async_llm import HuggingFaceLLM

    async with HuggingFaceLLM(model_path, device="cpu", dtype=dtype) as llm:
        llm.engine.ready.wait()
        prompts = [f"Request {i}: {p}" for i, p in enumerate(BURST_PROMPTS)]
        results = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=new_tokens, ignore_eos=True) for p in prompts)
        )
        return llm.engine.runner.name, [r.token_ids for r in results]


def main() -> None:
    from async_llm import HuggingFaceLLM

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    report: dict[str, Any] = {"text": f"pydoc_data.topics {SECTIONS}", "tokens": args.tokens}
    reference: list[list[int]] | None = None
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        with HuggingFaceLLM(args.model, device="cpu", dtype=dtype, fast_path=False) as llm:
            ids = llm.tokenizer(text()).input_ids[: args.tokens]
            entry: dict[str, Any] = {"perplexity": perplexity(llm.model, ids)}
        entry["runner"], tokens = asyncio.run(greedy(args.model, dtype, args.new_tokens))
        if reference is None:
            reference = tokens
        agree = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(t)) for t, r in zip(tokens, reference)]
        entry["greedy_tokens_agreeing_with_first"] = agree
        report[name] = entry
        print(json.dumps({name: entry}))
    first = args.dtypes.split(",")[0]
    for name in args.dtypes.split(",")[1:]:
        ratio = report[name]["perplexity"] / report[first]["perplexity"]
        print(f"{name}: perplexity {report[name]['perplexity']:.3f} = {ratio:.4f}x {first}'s")


if __name__ == "__main__":
    main()
