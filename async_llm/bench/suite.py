"""Runs every system over every workload: each system in its own process, runs interleaved.

Why a process per system: peak RSS is then that system's own (one model, its own buffers), nothing a
previous system allocated or a thread it left behind can touch the next measurement, and a system
that hangs is killed at its time limit without losing the others' results.

Why interleaved: every system is loaded and warmed up first, then each workload is run by one system
after the other, round after round (the starting system rotates). On a shared machine the speed
drifts over minutes; interleaving puts all systems under the same conditions, and the median over
rounds drops a round that another process disturbed. Each run also records ``other_cpu_share``: the
cores' time other processes used meanwhile (0.05 = 5% of one core), so a disturbed run is visible.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from async_llm.bench.session import ROOFLINE, Event, Session, serve
from async_llm.bench.workloads import PREFILL_KINDS, Workload

BASE = "async_llm"

#: Figures kept round by round, for the paired ratios of the targets (see ``report.evaluate_targets``).
PAIRED_FIGURES = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "peak_rss_mib")

__all__ = ["ROOFLINE", "SuiteOptions", "run_suite"]


@dataclass(frozen=True)
class SuiteOptions:
    """How the suite runs (not what it measures)."""

    isolate: bool = True
    system_timeout_s: float | None = None
    roofline_repeats: int = 1
    repeats: int = 1  # rounds of each burst workload
    mixed_repeats: int = 1  # rounds of the mixed workload
    progress: bool = True
    quiet_cores: float = 0.2  # other processes' CPU use (cores) above which the machine is "busy"
    quiet_wait_s: float = 0.0  # before each run, wait up to this long for the machine to be quiet
    noisy_retries: int = 0  # rerun a run during which other processes used more than 2 x quiet_cores


#: Sequential generate serves one request at a time: its tokens/s is the same at any concurrency, so
#: bursts larger than this only cost time (64 requests of 64 tokens take minutes).
SEQUENTIAL_MAX_BURST = 16


def _applies(name: str, workload: Workload) -> bool:
    from async_llm.bench.systems import SYSTEMS

    if name == ROOFLINE:
        return workload.kind == "burst"
    runner = SYSTEMS[name]
    if workload.kind in PREFILL_KINDS:  # the systems with a prefix cache and chunked prefill (and async_llm without)
        return runner.prefill_workloads
    if runner.prefill_only:
        return False
    if name == "transformers-sequential" and workload.concurrency is not None:
        return workload.concurrency <= SEQUENTIAL_MAX_BURST
    return True


def _machine_busy() -> float:
    t = psutil.cpu_times()
    busy: float = (
        t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
    )
    return busy


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and of its descendants, live or exited (a peer runs in a Python
    of its own under its system's process, and vLLM's engine core in a process of its own)."""
    try:
        t = process.cpu_times()
        live = process.children(recursive=True)
    except psutil.Error:
        return 0.0
    seconds: float = t.user + t.system + t.children_user + t.children_system
    for child in live:
        with contextlib.suppress(psutil.Error):  # exited meanwhile: counted by its parent once waited for
            c = child.cpu_times()
            seconds += c.user + c.system
    return seconds


def _own_cpu(workers: dict[str, Any], running: str) -> float:
    """CPU seconds so far of the suite's own process and of the processes of the system ``running``
    (its worker process and what that started). The other systems' processes are not its own: a peer
    idle between its runs may still spin (vLLM's workers poll their queues for a second after their
    last step, and its OpenMP threads for 200 ms), and that disturbs the system that runs. A system
    run in the suite's process (``--no-isolate``) shares it with every other such system and their
    peers' processes: there, all of them count as its own."""
    worker = workers[running]
    if not isinstance(worker, _ProcessWorker) or worker.process is None:
        return _cpu(psutil.Process())
    t = psutil.Process().cpu_times()
    return t.user + t.system + _cpu(worker.process)


def _wait_quiet(workers: dict[str, Any], running: str, options: SuiteOptions) -> float:
    """Wait (up to ``quiet_wait_s``) until processes other than the suite's and those of the system
    about to run (``running``) use less than ``quiet_cores``; returns the last measured load, in
    cores."""
    deadline = time.monotonic() + options.quiet_wait_s
    while True:
        busy0, own0, t0 = _machine_busy(), _own_cpu(workers, running), time.perf_counter()
        time.sleep(1.0)
        other = max(0.0, _machine_busy() - busy0 - (_own_cpu(workers, running) - own0)) / (time.perf_counter() - t0)
        if other < options.quiet_cores or time.monotonic() > deadline:
            return other


class _InlineWorker:
    """A system run in the suite's own process (``--no-isolate``: quick to start, shared RSS)."""

    def __init__(self, name: str, config: Any, workloads: Sequence[Workload], options: SuiteOptions) -> None:
        self.name = name
        self.workloads = workloads
        self.session = Session(name, config, workloads, options.roofline_repeats)
        self.process = psutil.Process()

    def launch(self) -> None:
        pass

    def ready(self, timeout: float | None) -> str | None:
        try:
            return self.session.start()
        except Exception as exc:  # noqa: BLE001  # a system that cannot start is reported as a skip, not fatal
            return f"crashed: {type(exc).__name__}: {exc}"

    def run(self, index: int, sink: Callable[[Event], None], timeout: float | None) -> str | None:
        self.session.run(self.workloads[index], sink)
        return None

    def close(self) -> None:
        self.session.close()


class _ProcessWorker:
    """A system in its own spawned process, driven over a pipe (see :func:`session.serve`)."""

    def __init__(self, name: str, config: Any, workloads: Sequence[Workload], options: SuiteOptions) -> None:
        self.name = name
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve,
            args=(name, config, list(workloads), options.roofline_repeats, child),
            name=f"bench-{name}",
            daemon=True,
        )
        self._child = child
        self.process: psutil.Process | None = None

    def launch(self) -> None:
        self.proc.start()
        self._child.close()
        self.process = psutil.Process(self.proc.pid)

    def _receive(self, deadline: float | None) -> Event | str:
        """The next event, or why none will come (exit, timeout)."""
        while not self.conn.poll(0.2):
            if not self.proc.is_alive() and not self.conn.poll():
                return f"its process exited with code {self.proc.exitcode}"
            if deadline is not None and time.monotonic() > deadline:
                self.proc.kill()
                return "timed out (--system-timeout)"
        try:
            event: Event = self.conn.recv()
        except EOFError:
            return f"its process exited with code {self.proc.exitcode}"
        return event

    def ready(self, timeout: float | None) -> str | None:
        event = self._receive(time.monotonic() + timeout if timeout else None)
        if isinstance(event, str):
            return event
        return None if event[0] == "ready" else event[1]

    def run(self, index: int, sink: Callable[[Event], None], timeout: float | None) -> str | None:
        """Run workload ``index``; returns why the system is gone, or ``None`` when it can go on."""
        deadline = time.monotonic() + timeout if timeout else None
        self.conn.send(("run", index))
        while True:
            event = self._receive(deadline)
            if isinstance(event, str):
                return event
            if event[0] == "idle":
                return None
            if event[0] == "skip":
                reason: str = event[1]
                return reason
            sink(event)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("stop",))
            self.proc.join(timeout=60)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()


def _aggregate(runs: list[dict[str, Any]], roofline: bool) -> dict[str, Any]:
    """One entry from several rounds: medians (the roofline keeps its fastest round), with the spread."""
    if roofline:
        best = dict(min(runs, key=lambda r: r["total_s"]))
        best["rounds"] = len(runs)
        best["per_round"] = {k: [r.get(k) for r in runs] for k in ("decode_step_ms", "matmul_step_ms")}
        return best
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif len(numbers) == len(values):
            out[key] = statistics.median(numbers)
        else:
            out[key] = first
    out["rounds"] = len(runs)
    # Round by round, in run order: the targets compare systems within each round (the same minutes
    # of a machine whose speed drifts), then take the median of those ratios.
    out["per_round"] = {k: [r.get(k) for r in runs] for k in PAIRED_FIGURES}
    if len(runs) > 1:
        out["spread"] = {
            k: [min(r[k] for r in runs), max(r[k] for r in runs)]
            for k in ("output_tokens_per_s", "ttft_p99_ms", "tpot_p50_ms")
            if all(isinstance(r.get(k), (int, float)) for r in runs)
        }
    return out


def run_suite(
    config: Any,
    workloads: Sequence[Workload],
    systems: Sequence[str],
    options: SuiteOptions,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run ``systems`` (names of :data:`~async_llm.bench.systems.SYSTEMS` or :data:`ROOFLINE`) over ``workloads``.

    Returns:
        ``(results, roofline, info)``: results[workload][system] -> figures, medians over rounds (or
        ``{"skipped": why}``); roofline[workload] -> bare-forward timings (fastest round);
        info[system] -> ``skipped`` (why it did not run, or None), ``seconds`` of measured runs and
        ``other_cpu_share`` (the worst run's; near 0: clean, 0.5 or more: noisy figures).
    """
    from tqdm import tqdm

    make = _ProcessWorker if options.isolate else _InlineWorker
    workers = {name: make(name, config, workloads, options) for name in systems}
    info: dict[str, dict[str, Any]] = {
        name: {"skipped": None, "seconds": 0.0, "other_cpu_share": 0.0} for name in systems
    }
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], str] = {}
    plan = []
    for index, workload in enumerate(workloads):
        rounds = options.repeats if workload.kind in ("burst", "grounded") else options.mixed_repeats
        for r in range(max(1, rounds)):
            names = [n for n in systems if _applies(n, workload) and n != ROOFLINE]
            shift = r % max(1, len(names))
            names = names[shift:] + names[:shift]
            if ROOFLINE in systems and _applies(ROOFLINE, workload):
                # The bare forwards run right before async_llm, so their ratio is taken minutes apart at most.
                names.insert(names.index(BASE) if BASE in names else 0, ROOFLINE)
            plan += [(index, name) for name in names]
    say = tqdm.write if options.progress else log
    total = sum(len(workloads[i].requests) for i, _ in plan)
    with tqdm(total=total, unit="req", desc="bench", disable=not options.progress, dynamic_ncols=True) as bar:
        bar.set_postfix_str("loading and warming up")
        for worker in workers.values():  # all load at once; nothing is measured until all are ready
            worker.launch()
        for name, worker in workers.items():
            reason = worker.ready(options.system_timeout_s)
            if reason:
                info[name]["skipped"] = reason
                say(f"skip {name}: {reason}")
        for index, name in plan:
            workload, worker = workloads[index], workers[name]
            if info[name]["skipped"]:
                bar.update(len(workload.requests))
                continue
            bar.set_postfix_str(f"{name} on {workload.name}")
            ticks = 0

            # workload and name are bound now: the sink is only called during this iteration's runs.
            def sink(event: Event, workload: Workload = workload, name: str = name) -> None:
                nonlocal ticks
                if event[0] == "tick":  # (a rerun ticks again: the bar counts each request once)
                    step = min(event[1], len(workload.requests) - ticks)
                    ticks += step
                    bar.update(step)
                elif event[0] == "result":
                    runs.setdefault((event[1], name), []).append(event[2])
                elif event[0] == "error":
                    errors[(event[1], name)] = event[2]
                    say(f"{name} on {event[1]}: failed: {event[2]}")

            for attempt in range(options.noisy_retries + 1):
                if options.quiet_wait_s > 0:
                    _wait_quiet(workers, name, options)
                left = None if options.system_timeout_s is None else options.system_timeout_s - info[name]["seconds"]
                done_before = len(runs.get((workload.name, name), []))
                started, busy0, own0 = time.perf_counter(), _machine_busy(), _own_cpu(workers, name)
                gone = worker.run(index, sink, left)
                seconds = time.perf_counter() - started
                other = max(0.0, _machine_busy() - busy0 - (_own_cpu(workers, name) - own0)) / max(seconds, 1e-9)
                info[name]["seconds"] += seconds
                fresh = runs.get((workload.name, name), [])[done_before:]
                for figures in fresh:
                    figures["other_cpu_share"] = round(other, 3)
                noisy = other > 2 * options.quiet_cores and attempt < options.noisy_retries and not gone
                if noisy and fresh:  # disturbed: drop it and run it again
                    say(f"{name} on {workload.name}: other processes used {other:.2f} cores; running it again")
                    del runs[(workload.name, name)][done_before:]
                    continue
                info[name]["other_cpu_share"] = round(max(info[name]["other_cpu_share"], other), 3)
                break
            bar.update(max(0, len(workload.requests) - ticks))
            if gone:
                info[name]["skipped"] = f"stopped on {workload.name}: {gone}"
                say(f"{name}: {gone}; its remaining runs are skipped")
        for worker in workers.values():
            worker.close()
    results: dict[str, dict[str, dict[str, Any]]] = {w.name: {} for w in workloads}
    roofline: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        for name in systems:
            if not _applies(name, workload):
                continue
            key = (workload.name, name)
            if key in runs:
                entry = _aggregate(runs[key], name == ROOFLINE)
            else:
                entry = {"skipped": errors.get(key) or info[name]["skipped"] or "no result"}
            if name == ROOFLINE:
                if "skipped" not in entry:
                    roofline[workload.name] = entry
            else:
                results[workload.name][name] = entry
    for entry in info.values():
        entry["seconds"] = round(entry["seconds"], 1)
    return results, roofline, info
