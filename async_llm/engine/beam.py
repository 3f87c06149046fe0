"""Beam search: requests with ``num_beams > 1`` decoded by padded ``model.generate`` groups.

Beam search keeps ``num_beams`` hypotheses per request and reorders them every step, which does not
fit the shared one-row-per-request decode step. So beam requests go to their own worker thread:
requests with the same decoding settings that are waiting together are left-padded into one
``generate`` call. The continuous batch keeps decoding meanwhile (on a GPU both overlap; on a CPU
they share the cores). A beam result arrives as one delta when its group finishes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from async_llm.engine.finish import finish_reason
from async_llm.engine.output import FinishReason, StepOutputs
from async_llm.engine.request import Request
from async_llm.engine.scheduler import Scheduler
from async_llm.engine.worker import Worker
from async_llm.errors import EngineClosedError, GenerationError, RequestAbortedError
from async_llm.log import get_logger
from async_llm.sampling_params import SamplingParams

log = get_logger("async_llm.engine.beam")


@dataclasses.dataclass(eq=False)
class BeamJob:
    """One prompt decoded by beam search; ``requests`` are its ``n`` returned sequences."""

    requests: list[Request]

    @property
    def params(self) -> SamplingParams:
        return self.requests[0].params

    @property
    def group_key(self) -> SamplingParams:
        # Stop strings are applied to each result afterwards: they don't split groups.
        return dataclasses.replace(self.params, stop=())


class _AbortedGroup(StoppingCriteria):
    """Stops ``generate`` early once every request of the group was aborted, or the LLM is closing."""

    def __init__(self, runner: BeamRunner, request_ids: list[str]) -> None:
        self.runner = runner
        self.request_ids = request_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        aborted = self.runner.closed or all(self.runner.is_aborted(i) for i in self.request_ids)
        return torch.full((input_ids.shape[0],), aborted, dtype=torch.bool, device=input_ids.device)


class BeamRunner(Worker):
    """Worker thread running beam-search groups.

    Args:
        model: The causal LM (shared with the engine; forward passes don't mutate it).
        pad_token_id: Id used for left padding.
        max_group: Most prompts in one ``generate`` call.
        max_queue_size: Most jobs waiting; :meth:`submit` raises past it.
    """

    def __init__(self, model: Any, pad_token_id: int, max_group: int = 8, max_queue_size: int = 1024) -> None:
        # The scheduler owns the requests' states and counters; the jobs only group them.
        super().__init__("async-llm-beams", Scheduler(max_batch_size=max_group), max_queue_size)
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_group = max_group
        self.waiting: deque[BeamJob] = deque()

    # -- Worker hooks ---------------------------------------------------------------------------------
    def _accept(self, items: list[BeamJob]) -> None:
        for job in items:
            for request in job.requests:
                self.scheduler.add(request)
        self.waiting.extend(items)

    def _is_idle(self) -> bool:
        return True  # a group runs to completion inside one step

    def _waiting_count(self) -> int:
        return len(self.waiting)  # in jobs, as submit() counts them against the queue bound

    def _apply_aborts(self, request_ids: set[str], out: StepOutputs) -> None:
        for job in list(self.waiting):
            live = [r for r in job.requests if r.request_id not in request_ids]
            for r in job.requests:
                if r.request_id in request_ids:
                    self._end(r, FinishReason.ABORT, out, RequestAbortedError(f"request {r.request_id} was aborted"))
            if live:
                job.requests = live
            else:
                self.waiting.remove(job)

    def _fail_live(self, error: BaseException, out: StepOutputs, reason_closed: bool) -> None:
        reason = FinishReason.ABORT if reason_closed else FinishReason.ERROR
        self.waiting.clear()
        for request in list(self.scheduler.all_live()):
            self._end(request, reason, out, error)

    def _step(self, out: StepOutputs, admit: bool) -> bool:
        if not (admit and self.waiting):
            return False
        first = self.waiting.popleft()
        group = [first]
        for job in list(self.waiting):
            if len(group) < self.max_group and job.group_key == first.group_key:
                group.append(job)
                self.waiting.remove(job)
        self.scheduler.start([r for job in group for r in job.requests])
        self._recount_waiting()
        try:
            results = self._generate(group)
        except Exception as exc:  # noqa: BLE001  # any failure of generate fails this group only
            error = GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            for job in group:
                for r in job.requests:
                    self._end(r, FinishReason.ERROR, out, error)
            log.error("beam group failed", size=len(group), error=repr(exc))
        else:
            for job, sequences in zip(group, results):
                for request, tokens in zip(job.requests, sequences):
                    if self.closed:  # generate was cut short by close(): not a real result
                        self._end(
                            request,
                            FinishReason.ABORT,
                            out,
                            EngineClosedError("the LLM was closed before this request finished"),
                        )
                    else:
                        self._finish(request, tokens, out)
        return True

    # -- work -------------------------------------------------------------------------------------------
    def _generate(self, group: list[BeamJob]) -> list[list[list[int]]]:
        """One padded generate call; returns, per job, its n sequences of new token ids."""
        params = group[0].params
        prompts = [job.requests[0].prompt_ids for job in group]
        width = max(len(p) for p in prompts)
        device = self.model.get_input_embeddings().weight.device
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        eos = sorted(group[0].requests[0].end_ids)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            num_beams=params.num_beams,
            num_return_sequences=params.n,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            do_sample=not params.greedy,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=self.pad_token_id,
            eos_token_id=eos or None,
        )
        if not params.greedy:
            kwargs.update(temperature=params.effective_temperature, top_k=params.top_k or None, top_p=params.top_p)
            if params.min_p:
                kwargs["min_p"] = params.min_p
            if params.seed is not None:
                torch.manual_seed(params.seed)  # this thread only runs generate: the global RNG is ours
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_tokens
        ids_all = [r.request_id for job in group for r in job.requests]
        output = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            stopping_criteria=StoppingCriteriaList([_AbortedGroup(self, ids_all)]),
            **kwargs,
        )
        new = output[:, width:].tolist()  # [len(group) * n, new_tokens]
        return [new[i * params.n : (i + 1) * params.n] for i in range(len(group))]

    def _finish(self, request: Request, tokens: list[int], out: StepOutputs) -> None:
        if self.is_aborted(request.request_id):
            self._end(
                request, FinishReason.ABORT, out, RequestAbortedError(f"request {request.request_id} was aborted")
            )
            return
        # The engine's finish rule, token by token: generate pads finished beams after their end.
        reason = FinishReason.LENGTH
        for token in tokens:
            request.output_ids.append(token)
            ended = finish_reason(request, token)
            if ended is not None:
                reason = ended
                break
        tokens = request.output_ids
        detok = request.detokenizer
        self.scheduler.record_tokens(len(tokens))
        self.scheduler.finish(request, reason)
        out.add(request, detok.take_delta(final=True), tokens, reason)
        log.info(
            "finished",
            request_id=request.request_id,
            reason=reason.value,
            tokens=len(tokens),
            beams=request.params.num_beams,
        )

    def _end(self, request: Request, reason: FinishReason, out: StepOutputs, error: BaseException) -> None:
        self.scheduler.finish(request, reason)
        out.add(request, reason=reason, error=error)
