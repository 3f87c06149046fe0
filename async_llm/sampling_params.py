"""Per-request sampling parameters: defaults, aliases, merging and validation.

Validation happens here, in the caller's thread, before a request is queued: a bad value never
reaches the engine, so it can never disturb other requests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.param_names import ALIASES, by_field
from async_llm.response_model import is_response_model, response_format_of
from async_llm.token_params import (
    MAX_TOP_LOGPROBS,
    STRUCTURED_FIELDS,
    GrammarSpec,
    grammar_spec,
    int_tuple,
    is_int,
    logit_bias,
    number,
)

#: The values ``priority`` may take (a 32-bit int, as vLLM's).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)

#: Fields that are bookkeeping, not sampling parameters: :meth:`SamplingParams.merge` refuses them.
_INTERNAL_FIELDS = frozenset({"max_tokens_explicit", "response_model"})


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidParameterError(name, f"{name} must be in {bracket}{low}, {high}], got {value}")


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise ParameterTypeError("stop", f"stop must be a str or a list of str, got {type(value).__name__}")
    stops = tuple(value)
    for s in stops:
        if not isinstance(s, str):
            raise ParameterTypeError(
                "stop", f"stop must be a str or a list of str, got an item of type {type(s).__name__}"
            )
        if not s:
            raise InvalidParameterError("stop", "stop strings must be non-empty")
    return stops


# Upper bounds that keep one request from taking over the batch (rows) or the device (beams).
MAX_N = 64
MAX_BEAMS = 32
MAX_SEED = 2**63  # seeds are in [0, MAX_SEED): a torch generator's seed
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Every field is validated on construction (:meth:`merge` also
    takes None for a default, and a parameter with its alias).

    Args:
        max_tokens: Number of new tokens to generate at most (>= 1). When it was not given
            (``max_tokens_explicit`` is False) the model lowers it to what fits its context after the
            prompt, as vLLM does; a given one that does not fit is an error naming ``max_tokens``.
        temperature: Softmax temperature (>= 0). 0 means greedy decoding.
        top_k: Keep the k most likely tokens; 0 or -1 turns it off. A whole float (``40.0``, as the
            swarm_models interface types it) is taken as that int; ``40.5`` is refused.
        top_p: Nucleus sampling mass, 0 < top_p <= 1 (1 turns it off).
        min_p: Drop tokens whose probability is below ``min_p`` times the top token's (0..1, 0 off).
        repetition_penalty: > 0; divides positive (multiplies negative) logits of tokens already in
            the prompt or output, as in transformers. 1 turns it off.
        frequency_penalty: -2..2; subtracted once per earlier occurrence of a token in the output.
        presence_penalty: -2..2; subtracted once from every token already in the output.
        seed: Seeds this request's own random generator: the same seed gives the same text on every
            run, whatever else is in the batch.
        stop: Strings that end generation; the stop string itself is never returned.
        ignore_eos: Keep generating past the end-of-sequence token (until ``max_tokens``).
        do_sample: ``None`` samples when ``temperature > 0``; ``False`` forces greedy decoding;
            ``True`` forces sampling (at temperature 1.0 when ``temperature`` is 0).
        n: Completions per prompt (alias ``num_return_sequences``), decoded as ``n`` rows of the
            batch sharing one prefill; a seeded request gives row ``i`` the seed ``seed + i``
            (:func:`choice_seed`).
        num_beams: Beam search width (alias ``beam_width``); > 1 decodes through a padded
            ``model.generate`` group instead of the shared decode step.
        length_penalty: Beam search only: exponent on the length when scoring finished beams.
        early_stopping: Beam search only: ``True``, ``False`` or ``"never"``, as in transformers.
        max_length: Cap on prompt plus output tokens, as in transformers (``max_tokens`` still applies).
        logprobs: Return the log-probability of each generated token (from the model's raw
            distribution: before temperature, penalties, biases and masks, as vLLM's default
            ``logprobs_mode``).
        top_logprobs: With ``logprobs``, also the ``k`` most likely tokens at each position (0..20).
        prompt_logprobs: Log-probabilities of the prompt's own tokens, with the ``k`` most likely
            alternatives at each position (0..20); costs one extra forward over the prompt.
        min_tokens: Generate at least this many tokens: eos and ``stop_token_ids`` are masked until then.
        stop_token_ids: Token ids that end generation, like eos (the token is in ``token_ids``, not in the text).
        logit_bias: ``{token_id: bias}`` added to the logits (bias in [-100, 100]; -100 bans, 100 forces).
        bad_words: Words never generated: the last token of each of their tokenizations is banned
            whenever the tokens before it were just generated.
        allowed_token_ids: Only these token ids may be generated.
        include_stop_str_in_output: Keep the stop string that ended generation in the text.
        skip_special_tokens: Leave special tokens out of the text (True by default).
        logits_processors: Callables ``f(output_ids, logits) -> logits`` (or ``f(prompt_ids,
            output_ids, logits)``) applied to the request's ``[V]`` logits each step on the engine
            thread; one that raises fails only its request.
        response_format: OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema",
            "json_schema": {"name": ..., "schema": {...}}}``: the output is JSON (following the schema).
            A pydantic model class is taken as its JSON schema, named after it (as the openai client
            does); it is then kept as ``response_model``, and a completion's ``parsed`` is the
            output validated into it.
        guided_json: A JSON schema (dict or JSON text) the output follows.
        guided_regex: A regular expression the whole output matches.
        guided_choice: A list of strings; the output is exactly one of them.
        guided_grammar: A grammar (Lark or GBNF/EBNF) the output follows.
        priority: Scheduling priority under ``scheduling_policy="priority"``: lower runs first
            (vLLM's convention), within ``PRIORITY_RANGE``; default 0. Ignored (as order) by "fcfs".
        timeout: Seconds from submission to the last token; past it the request ends with
            :class:`~async_llm.errors.RequestTimeoutError` and its row is freed. None: no limit.
        queue_timeout: Seconds the request may wait for a row (each time it waits).
        stall_timeout: Seconds the request may go without a new token once running.
        speculative_config: This request's n-gram speculative decoding (a dict of vLLM's keys, see
            ``HuggingFaceLLM``), ``False`` to turn the engine's off for it; None or True: the engine's.
        max_tokens_explicit: Whether ``max_tokens`` was given rather than defaulted (set by
            :meth:`merge`; ``None`` infers it: any value but the default 256 was given).
        response_model: The pydantic class ``response_format`` came from (set on construction;
            dropped when ``response_format`` changes).

    Raises:
        TypeError: A field has the wrong type.
        ValueError: A field is out of range; the message names the field and the range.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    do_sample: bool | None = None
    n: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    max_length: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logits_processors: tuple[Callable[..., Any], ...] = ()
    response_format: Mapping[str, Any] | type | None = None
    guided_json: Mapping[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: tuple[str, ...] | None = None
    guided_grammar: str | None = None
    speculative_config: Any = None
    priority: int = 0
    timeout: float | None = None
    queue_timeout: float | None = None
    stall_timeout: float | None = None
    max_tokens_explicit: bool | None = field(default=None, repr=False, compare=False)
    response_model: type | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise through object.__setattr__
        if self.max_tokens_explicit is None:
            set_(self, "max_tokens_explicit", self.max_tokens != DEFAULT_MAX_TOKENS)
        if is_response_model(self.response_format):
            set_(self, "response_model", self.response_format)
            set_(self, "response_format", response_format_of(self.response_format))
        elif self.response_model is not None and self.response_format is not response_format_of(self.response_model):
            set_(self, "response_model", None)  # the format was replaced: the class no longer describes it
        top_k: Any = self.top_k
        if isinstance(top_k, float) and math.isfinite(top_k):  # Optional[float] in swarm_models
            if not top_k.is_integer():
                raise InvalidParameterError("top_k", f"top_k must be a whole number, got {top_k}")
            set_(self, "top_k", int(top_k))
        if not is_int(self.max_tokens):
            raise ParameterTypeError("max_tokens", f"max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise InvalidParameterError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not is_int(self.top_k):
            raise ParameterTypeError("top_k", f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise InvalidParameterError("top_k", f"top_k must be 0 or -1 (off) or >= 1, got {self.top_k}")
        set_(self, "top_k", max(self.top_k, 0))
        temperature = number("temperature", self.temperature)
        _check_range("temperature", temperature, 0.0, math.inf)
        set_(self, "temperature", temperature)
        top_p = number("top_p", self.top_p)
        _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
        set_(self, "top_p", top_p)
        min_p = number("min_p", self.min_p)
        _check_range("min_p", min_p, 0.0, 1.0)
        set_(self, "min_p", min_p)
        if not is_int(self.priority):
            raise ParameterTypeError("priority", f"priority must be an int, got {type(self.priority).__name__}")
        if not PRIORITY_RANGE[0] <= self.priority <= PRIORITY_RANGE[1]:
            raise InvalidParameterError(
                "priority", f"priority must be in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}], got {self.priority}"
            )
        for name in ("timeout", "queue_timeout", "stall_timeout"):
            value = getattr(self, name)
            if value is not None:
                seconds = number(name, value)
                if not (math.isfinite(seconds) and seconds > 0):
                    raise InvalidParameterError(name, f"{name} must be a positive number of seconds, got {value!r}")
                set_(self, name, seconds)
        if self.speculative_config is True:
            set_(self, "speculative_config", None)
        elif self.speculative_config is not False:
            from async_llm.engine.speculative import SpeculativeConfig  # the engine's: imported when used

            set_(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        rep = number("repetition_penalty", self.repetition_penalty)
        _check_range("repetition_penalty", rep, 0.0, math.inf, low_open=True)
        set_(self, "repetition_penalty", rep)
        for name in ("frequency_penalty", "presence_penalty"):
            value = number(name, getattr(self, name))
            _check_range(name, value, -2.0, 2.0)
            set_(self, name, value)
        if self.seed is not None and not is_int(self.seed):
            raise ParameterTypeError("seed", f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise InvalidParameterError("seed", f"seed must be in [0, 2**63), got {self.seed}")
        set_(self, "stop", _stop_tuple(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise ParameterTypeError("ignore_eos", f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ParameterTypeError(
                "do_sample", f"do_sample must be a bool or None, got {type(self.do_sample).__name__}"
            )
        self._check_beams()
        self._check_token_controls()
        object.__setattr__(self, "_grammar", grammar_spec(self))
        if self.num_beams > 1 and (self.priority or self.timeout or self.queue_timeout or self.stall_timeout):
            name = next(n for n in ("priority", "timeout", "queue_timeout", "stall_timeout") if getattr(self, n))
            raise InvalidParameterError(
                name, f"{name} applies to the shared decode step; beam search (num_beams > 1) runs apart"
            )
        if self.num_beams > 1:
            for name in self.token_control_fields():
                raise InvalidParameterError(name, f"{name} is not supported with beam search (num_beams > 1)")

    def _check_token_controls(self) -> None:
        set_ = object.__setattr__
        for name in ("logprobs", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterTypeError(name, f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("top_logprobs", "min_tokens"):
            value = getattr(self, name)
            if not is_int(value):
                raise ParameterTypeError(name, f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameterError(
                "top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "top_logprobs needs logprobs=True")
        if self.prompt_logprobs is not None:
            if not is_int(self.prompt_logprobs):
                raise ParameterTypeError(
                    "prompt_logprobs",
                    f"prompt_logprobs must be an int or None, got {type(self.prompt_logprobs).__name__}",
                )
            if not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidParameterError(
                    "prompt_logprobs", f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}"
                )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        set_(self, "stop_token_ids", int_tuple("stop_token_ids", self.stop_token_ids or ()))
        if self.allowed_token_ids is not None:
            set_(self, "allowed_token_ids", int_tuple("allowed_token_ids", self.allowed_token_ids, empty_ok=False))
        set_(self, "logit_bias", logit_bias(self.logit_bias))
        bad = self.bad_words or ()
        if isinstance(bad, str) or not isinstance(bad, Iterable) or not all(isinstance(w, str) and w for w in bad):
            raise ParameterTypeError("bad_words", "bad_words must be a list of non-empty str")
        set_(self, "bad_words", tuple(bad))
        processors = self.logits_processors or ()
        if callable(processors) or not isinstance(processors, Iterable) or not all(callable(f) for f in processors):
            raise ParameterTypeError("logits_processors", "logits_processors must be a list of callables")
        set_(self, "logits_processors", tuple(processors))
        if (
            self.guided_choice is not None
            and not isinstance(self.guided_choice, str)
            and isinstance(self.guided_choice, Iterable)
        ):
            set_(self, "guided_choice", tuple(self.guided_choice))

    def token_control_fields(self) -> list[str]:
        """Names of the token controls, logprobs and structured-output fields set to other than their defaults."""
        defaults = _DEFAULTS
        names = (
            "logprobs", "top_logprobs", "prompt_logprobs", "min_tokens", "stop_token_ids", "logit_bias",
            "bad_words", "allowed_token_ids", "logits_processors", *STRUCTURED_FIELDS,
        )  # fmt: skip
        return [name for name in names if getattr(self, name) != getattr(defaults, name)]

    @property
    def grammar(self) -> GrammarSpec | None:
        """The structured-output constraint, normalised, or None."""
        return self._grammar  # type: ignore[attr-defined]

    @property
    def needs_controls(self) -> bool:
        """Whether the engine must touch this row's logits beyond sampling (masks, biases, processors)."""
        return bool(
            self.min_tokens or self.logit_bias or self.bad_words or self.allowed_token_ids is not None
            or self.logits_processors or self.grammar is not None
        )  # fmt: skip

    def _check_beams(self) -> None:
        for name, low, high in (("n", 1, MAX_N), ("num_beams", 1, MAX_BEAMS)):
            value = getattr(self, name)
            if not is_int(value):
                raise ParameterTypeError(name, f"{name} must be an int, got {type(value).__name__}")
            if not low <= value <= high:
                raise InvalidParameterError(name, f"{name} must be in [{low}, {high}], got {value}")
        if self.num_beams > 1 and self.n > self.num_beams:
            raise InvalidParameterError(
                "n", f"n (num_return_sequences) must be <= num_beams with beam search, got {self.n} > {self.num_beams}"
            )
        if self.num_beams > 1 and (self.frequency_penalty or self.presence_penalty):
            raise InvalidParameterError(
                "frequency_penalty",
                "frequency_penalty and presence_penalty are not supported with beam search (num_beams > 1)",
            )
        object.__setattr__(self, "length_penalty", number("length_penalty", self.length_penalty))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidParameterError(
                "early_stopping", f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if self.max_length is not None:
            if not is_int(self.max_length):
                raise ParameterTypeError(
                    "max_length", f"max_length must be an int or None, got {type(self.max_length).__name__}"
                )
            if self.max_length < 1:
                raise InvalidParameterError("max_length", f"max_length must be >= 1, got {self.max_length}")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """Names accepted by :meth:`merge`: the fields and their aliases."""
        return (frozenset(f.name for f in dataclasses.fields(cls)) - _INTERNAL_FIELDS) | frozenset(ALIASES)

    def merge(self, **overrides: Any) -> SamplingParams:
        """Return a copy with ``overrides`` applied (aliases accepted) and validated.

        ``None`` sets a parameter to its default (``set_seed(None)`` clears the seed,
        ``max_tokens=None`` is the default that fits the context). A parameter given under two
        names (``beam_width`` and ``num_beams``) is fine when one is None or both agree.

        Raises:
            TypeError: An unknown parameter name, a value of the wrong type, or a parameter and its
                alias given different values (the message names both).
            ValueError: A value out of range.
        """
        if not overrides:
            return self
        changes = by_field(overrides, self.field_names() - frozenset(ALIASES))
        if "max_tokens" in changes:
            changes["max_tokens_explicit"] = changes["max_tokens"] is not None
        for name, value in changes.items():
            if value is None:
                changes[name] = getattr(_DEFAULTS, name)
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        """Whether this request is decoded greedily (argmax)."""
        if self.do_sample is None:
            return self.temperature == 0.0
        return not self.do_sample

    @property
    def effective_temperature(self) -> float:
        """The temperature used when sampling (1.0 when sampling is forced at temperature 0)."""
        return self.temperature if self.temperature > 0 else 1.0

    @property
    def beam_search(self) -> bool:
        """Whether this request is decoded by beam search (``num_beams > 1``)."""
        return self.num_beams > 1

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-friendly values (``stop`` as a list)."""
        skipped = ("logits_processors", "response_model")  # callables and classes: not JSON
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skipped}
        for name in ("stop", "stop_token_ids", "bad_words", "allowed_token_ids", "guided_choice"):
            if values[name] is not None:
                values[name] = list(values[name])
        values["logit_bias"] = {str(token): bias for token, bias in self.logit_bias}
        return values

    @property
    def uses_penalties(self) -> bool:
        """Whether any repetition/frequency/presence penalty is active."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` (0-based) of a request for ``n`` choices seeded with ``seed``.

    Choice ``i`` is seeded ``seed + i`` (wrapping within the seeds' range): each choice draws its own
    random numbers, the first is the request a single choice would make, and every choice is the
    same on every run. An unseeded request's choices stay unseeded. The Python API and the server
    both expand ``n`` with this rule.
    """
    if seed is None or index == 0 or not (is_int(seed) and 0 <= seed < MAX_SEED):
        return seed  # as given: an invalid seed is refused by validation, naming the caller's value
    return (seed + index) % MAX_SEED


_DEFAULTS = SamplingParams()
