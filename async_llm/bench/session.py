"""One system's side of the suite: load it once, then run workloads on command.

A :class:`Session` lives in the system's own process (or in the suite's, with ``--no-isolate``). It
reports through an ``emit`` callback: ``("tick", n)`` per finished request (the progress bar), then
``("result", workload, figures)`` or ``("error", workload, message)`` for each run. :func:`serve` is
the entry point of a system's process: it answers ``("run", index)`` commands until ``("stop",)``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from async_llm.bench.workloads import RequestSpec, Workload

#: The pseudo-system that times bare forward passes (burst workloads only).
ROOFLINE = "roofline"

Event = tuple[Any, ...]
Emit = Callable[[Event], None]


def _warmup_batches(workloads: Sequence[Workload]) -> list[list[RequestSpec]]:
    """The untimed runs before the timed ones (a few tokens each): two short requests plus the
    longest mixed prompt, then each burst level's requests at once, so that no timed round is the
    first to meet its batch size (kernels chosen for it, buffers grown to it: a server's first
    burst pays that, its later ones do not, and vLLM allocates its cache before it serves)."""
    warm = list(workloads[0].requests[:2])
    mixed = [r for w in workloads if w.kind == "mixed" for r in w.requests]
    if mixed:
        warm.append(max(mixed, key=lambda r: len(r.prompt_ids)))
    batches = [warm]
    sizes = {len(warm)}
    for w in workloads:
        if w.kind in ("burst", "grounded") and len(w.requests) not in sizes:
            sizes.add(len(w.requests))
            batches.append(list(w.requests))
    return batches


class Session:
    """A loaded system (or the roofline's bare model), ready to run any of ``workloads``.

    Args:
        name: A key of :data:`async_llm.bench.systems.SYSTEMS`, or :data:`ROOFLINE`.
        config: The :class:`~async_llm.bench.systems.SystemConfig`.
        workloads: Every workload of the run (warm-up shapes come from them).
        roofline_repeats: Passes per roofline measurement (the best is kept).
    """

    def __init__(self, name: str, config: Any, workloads: Sequence[Workload], roofline_repeats: int = 1) -> None:
        self.name = name
        self.config = config
        self.workloads = list(workloads)
        self.roofline_repeats = roofline_repeats
        self._runner: Any = None
        self._model: Any = None
        self._pad = 0

    def start(self) -> str | None:
        """Load and warm up; returns why the system cannot run here, or ``None``."""
        import torch

        from async_llm.bench.systems import SYSTEMS, load_hf, pad_id

        if self.config.device == "cpu":
            torch.set_num_threads(self.config.threads)
        if self.name == ROOFLINE:
            self._model, tokenizer = load_hf(self.config)
            self._pad = pad_id(tokenizer, self._model)
            return None
        runner_cls = SYSTEMS[self.name]
        reason = runner_cls.unavailable(self.config)
        if reason is not None:
            return reason
        runner = runner_cls(self.config)
        try:
            runner.load()
            for batch in _warmup_batches(self.workloads):
                runner.warmup(batch)
        except Exception as exc:  # noqa: BLE001  # any failure of a peer to start is reported as a skip, not fatal
            return f"failed to start: {type(exc).__name__}: {exc}"
        self._runner = runner
        return None

    def run(self, workload: Workload, emit: Emit) -> None:
        """Run one workload and emit its figures (or the error that stopped it)."""
        import async_llm.bench.roofline as roofline
        from async_llm.bench.metrics import PeakMemory, summarise

        gc.collect()
        if self.name == ROOFLINE:
            figures = roofline.measure(self._model, workload, self._pad, self.config.device, self.roofline_repeats)
            emit(("tick", len(workload.requests)))
            emit(("result", workload.name, figures))
            return
        ticks = 0

        def on_done(n: int) -> None:
            nonlocal ticks
            ticks += n
            emit(("tick", n))

        try:
            with PeakMemory(self.config.device) as memory:
                records, start = self._runner.run(workload.requests, on_done)
        except Exception as exc:  # noqa: BLE001  # whatever stopped the run is reported as its error; the suite goes on
            emit(("tick", len(workload.requests) - ticks))
            emit(("error", workload.name, f"{type(exc).__name__}: {exc}"))
            return
        figures = summarise(records, start, memory.rss_mib, memory.gpu_mib)
        figures.update(self._runner.extra)
        emit(("result", workload.name, figures))

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        self._model = None


def _exit_with_parent() -> None:
    """Exit when the suite's process dies (killed mid-run, it cannot stop us): no orphan keeps a core busy."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


def serve(name: str, config: Any, workloads: Sequence[Workload], roofline_repeats: int, conn: Any) -> None:
    """Entry point of a system's process (spawned: a fresh interpreter, no state from the parent).

    Sends ``("ready",)`` or ``("skip", reason)``, then for each ``("run", index)`` the run's events and
    ``("idle",)``; exits on ``("stop",)`` (or when the suite goes away).
    """
    from transformers.utils import logging as hf_logging

    _exit_with_parent()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    session = Session(name, config, workloads, roofline_repeats)
    try:
        reason = session.start()
        conn.send(("skip", reason) if reason else ("ready",))
        while reason is None:
            command = conn.recv()
            if command[0] != "run":
                break
            session.run(workloads[command[1]], conn.send)
            conn.send(("idle",))
    except (EOFError, BrokenPipeError):
        pass  # the suite is gone
    except BaseException as exc:  # noqa: BLE001  # anything left: report it to the suite instead of dying silently
        conn.send(("skip", f"crashed: {type(exc).__name__}: {exc}"))
    finally:
        session.close()
        conn.close()
