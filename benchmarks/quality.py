"""Quality of a model in each dtype and with ``quantize="int8"``: perplexity on a fixed English text
that ships with Python, and greedy agreement with the first mode over 64 tokens on the benchmark
prompts.

    python benchmarks/quality.py [--model PATH] [--modes float32,bfloat16,int8,int8-bfloat16] [--tokens 4096]

A mode is a dtype (``float32``, ``bfloat16``), or ``int8`` followed by the dtype of everything but
the int8 products (``int8`` alone: float32). The text is ``pydoc_data.topics`` (Python's own
reference prose: the sections "assignment", "compound", "execmodel", "exceptions", "import", in that
order; the int8 calibration reads other sections), cut to ``--tokens`` tokens and scored in windows
of 1024 by the forward that serves the mode: the fast runner's (the transformers forward where the
fast runner does not take the model). Greedy agreement runs through
:class:`~async_llm.HuggingFaceLLM`: the tokens each prompt's continuation shares with the first
mode's before they part.
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


def perplexity(llm: Any, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids`` (windows of :data:`WINDOW` tokens), through
    the engine's fast decoder when it runs one, else the model's own forward."""
    llm.engine.ready.wait()
    decoder = getattr(llm.engine.runner, "decoder", None)
    nll, count = 0.0, 0

    def score() -> None:
        nonlocal nll, count
        with torch.inference_mode():
            for start in range(0, len(ids) - 1, WINDOW):
                window = ids[start : start + WINDOW + 1]
                if decoder is not None:
                    logits = decoder.sequence_logits(window[:-1])
                else:
                    logits = llm.model(torch.tensor([window[:-1]])).logits[0].float()
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum")
                nll, count = nll + float(loss), count + len(window) - 1

    llm.engine.call_when_idle(score).result()  # on the engine's thread, as its steps run
    return math.exp(nll / count)


def mode_options(mode: str) -> dict[str, Any]:
    """``HuggingFaceLLM`` arguments of a mode (see the module's docstring)."""
    quantize = mode.startswith("int8")
    name = mode.removeprefix("int8").removeprefix("-") or "float32"
    return {"dtype": getattr(torch, name), "quantize": "int8" if quantize else None}


async def greedy(llm: Any, new_tokens: int) -> tuple[str, list[list[int]]]:
    """The runner's name and the greedy tokens of the benchmark's burst prompts."""
    prompts = [f"Request {i}: {p}" for i, p in enumerate(BURST_PROMPTS)]
    results = await asyncio.gather(
        *(llm.acomplete(p, chat_template=False, max_tokens=new_tokens, ignore_eos=True) for p in prompts)
    )
    return llm.engine.runner.name, [r.token_ids for r in results]


def main() -> None:
    from async_llm import HuggingFaceLLM

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", "--dtypes", dest="modes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    report: dict[str, Any] = {"text": f"pydoc_data.topics {SECTIONS}", "tokens": args.tokens}
    reference: list[list[int]] | None = None
    modes = args.modes.split(",")
    for mode in modes:
        with HuggingFaceLLM(args.model, device="cpu", **mode_options(mode)) as llm:
            ids = llm.tokenizer(text()).input_ids[: args.tokens]
            entry: dict[str, Any] = {"perplexity": perplexity(llm, ids)}
            entry["runner"], tokens = asyncio.run(greedy(llm, args.new_tokens))
        if reference is None:
            reference = tokens
        agree = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(t)) for t, r in zip(tokens, reference)]
        entry["greedy_tokens_agreeing_with_first"] = agree
        report[mode] = entry
        print(json.dumps({mode: entry}))
    for mode in modes[1:]:
        ratio = report[mode]["perplexity"] / report[modes[0]]["perplexity"]
        print(f"{mode}: perplexity {report[mode]['perplexity']:.3f} = {ratio:.4f}x {modes[0]}'s")


if __name__ == "__main__":
    main()
