"""The benchmark suite: async_llm against plain transformers, transformers' continuous batching and
vLLM, on the same model, prompts and token counts, in one run (``async-llm bench``).

Modules: ``workloads`` (what is sent, seeded), ``systems`` (one runner per system), ``metrics``
(per-request records and figures), ``roofline`` (bare forward passes), ``suite`` (one process per
system, progress), ``report`` (JSON, Markdown, PNG) and ``cli``. Importing this package loads nothing
heavy; matplotlib and tqdm are needed only to run the suite (the ``bench`` extra).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the suite (see :func:`async_llm.bench.cli.main`)."""
    from async_llm.bench.cli import main as cli_main

    return cli_main(argv)
