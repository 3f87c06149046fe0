"""Two checkouts of async_llm against each other: output tokens/s of bursts, in paired rounds.

    python benchmarks/versus.py BASE_TREE NEW_TREE [--rounds 5] [--bursts 1,16] [--new-tokens 64]
                                [--fast-path both|on|off] [--model PATH]

A tree is a folder holding an ``async_llm`` package (a ``git worktree`` of another commit, for
one). Every round runs the bursts with BASE, then with NEW (or NEW first on odd rounds), each in a
fresh interpreter that imports the package from its tree, back to back, so each ratio compares two
runs that saw the same machine. It prints tokens/s per run, the NEW/BASE ratio per round and the
median of the paired ratios, and whether the greedy tokens of the two trees were identical. Run it
on a quiet machine (nothing else busy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_WORKER = r"""
import asyncio, json, sys, time
from async_llm import HuggingFaceLLM
from async_llm.bench.workloads import BURST_PROMPTS

model, fast, bursts, new_tokens = sys.argv[1] or None, sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])

async def burst(llm, n, tokens):
    prompts = [f"Request {i}: {BURST_PROMPTS[i % len(BURST_PROMPTS)]}" for i in range(n)]
    start = time.perf_counter()
    results = await asyncio.gather(
        *(llm.acomplete(p, chat_template=False, max_tokens=tokens, ignore_eos=True) for p in prompts)
    )
    return n * tokens / (time.perf_counter() - start), [r.token_ids for r in results]

async def main():
    async with HuggingFaceLLM(model, fast_path=fast, max_batch_size=64) as llm:
        await burst(llm, 4, 8)  # warm-up
        out = {}
        for b in bursts.split(","):
            rate, ids = await burst(llm, int(b), new_tokens)
            out[b] = [rate, ids]
        return out

print("RESULT " + json.dumps(asyncio.run(main())))
"""


def _run(tree: Path, model: str | None, fast: bool, bursts: str, new_tokens: int) -> dict[str, list[object]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-c", _WORKER, model or "", "1" if fast else "0", bursts, str(new_tokens)]
    done = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, list[object]] = json.loads(line[len("RESULT ") :])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bursts", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--fast-path", choices=["both", "on", "off"], default="on")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.fast_path]
    ratios: dict[tuple[bool, str], list[float]] = {}
    same = True
    for r in range(args.rounds):
        for fast in modes:
            order = [("base", args.base), ("new", args.new)]
            if r % 2:
                order.reverse()  # neither tree always runs on the warmer machine
            runs = {name: _run(tree, args.model, fast, args.bursts, args.new_tokens) for name, tree in order}
            for b in args.bursts.split(","):
                (base_rate, base_ids), (new_rate, new_ids) = runs["base"][b], runs["new"][b]
                same &= base_ids == new_ids
                ratio = float(new_rate) / float(base_rate)  # type: ignore[arg-type]
                ratios.setdefault((fast, b), []).append(ratio)
                mode = "fast" if fast else "plain"
                print(f"round {r} {mode} burst-{b}: base {base_rate:.1f} tok/s, new {new_rate:.1f} tok/s, {ratio:.3f}x")
    for (fast, b), values in ratios.items():
        spread = ", ".join(f"{x:.3f}" for x in values)
        mode = "fast" if fast else "plain"
        print(f"{mode} burst-{b}: median of paired ratios new/base {statistics.median(values):.3f}x ({spread})")
    print(f"greedy tokens identical in every run: {same}")


if __name__ == "__main__":
    main()
