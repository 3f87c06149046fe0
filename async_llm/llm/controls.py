"""The front end's half of structured output and token controls: grammars compiled with llguidance
off the event loop and off the engine thread (cached by their text), and each row's
:class:`~async_llm.engine.controls.RowControls` built from the request's parameters and the tokenizer.

Why llguidance rather than xgrammar: both compute a token mask per step from a compiled grammar, and
both run on a CPU; llguidance's wheel is 3 MB with no dependencies, while xgrammar's Linux wheel pulls
``triton`` (hundreds of MB) and ``apache-tvm-ffi``. llguidance computes masks lazily per step (no
ahead-of-time grammar compilation to wait for), takes JSON schemas, regular expressions, Lark and
GBNF, and bounds the work of a hostile grammar with :class:`llguidance.LLParserLimits`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import anyio

from async_llm.engine.controls import RowControls
from async_llm.engine.finish import end_ids
from async_llm.errors import InvalidParameterError
from async_llm.sampling_params import GrammarSpec, SamplingParams

# JSON as json.dumps writes it: no free whitespace (a model cannot wander into blank lines forever),
# and the separators models saw most in training.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """Compiles structured-output constraints into llguidance matchers for one tokenizer.

    Args:
        tokenizer: A fast transformers tokenizer.
        vocab_size: The model's vocabulary (its logits' width; may exceed the tokenizer's).
        cache_size: Compiled grammars kept, least recently used dropped first.
        timeout_s: A grammar that takes longer to compile is refused.
        max_grammar_size, max_lexer_states: llguidance's limits on a grammar's size and on the
            lexer's states (about 1-2 kB each): a grammar past them is refused.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        cache_size: int = 256,
        timeout_s: float = 10.0,
        max_grammar_size: int = 500_000,
        max_lexer_states: int = 250_000,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()  # spec -> matcher to copy, or the error
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self.timeout_s = timeout_s
        self._limits = (max_grammar_size, max_lexer_states)

    async def matchers(self, spec: GrammarSpec, count: int) -> list[Any]:
        """``count`` fresh matchers of ``spec`` (one per row), compiled in a worker thread.

        Raises:
            InvalidParameterError: The schema, regex, grammar or choices are invalid, exceed the
                limits, or took longer than ``timeout_s`` to compile (names ``spec.param``).
        """
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
        if cached is None:
            try:
                with anyio.fail_after(self.timeout_s):
                    cached = await anyio.to_thread.run_sync(self._compile, spec, abandon_on_cancel=True)
            except TimeoutError:
                raise InvalidParameterError(
                    spec.param, f"{spec.param} took longer than {self.timeout_s} s to compile; simplify it"
                ) from None
        if isinstance(cached, InvalidParameterError):
            raise InvalidParameterError(cached.param, str(cached))
        assert cached is not None
        matcher = cached
        # One matcher per row, copied off the loop: a large grammar's matcher takes milliseconds to copy.
        return await anyio.to_thread.run_sync(lambda: [matcher.deep_copy() for _ in range(count)])

    def _compile(self, spec: GrammarSpec) -> Any:
        import llguidance  # loaded with the first structured request

        try:
            grammar = _grammar_text(spec)
            limits = llguidance.LLParserLimits(max_grammar_size=self._limits[0], max_lexer_states=self._limits[1])
            tokenizer = self._llguidance_tokenizer()
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=limits)
            if is_error:
                raise InvalidParameterError(spec.param, f"{spec.param} is invalid: {messages[0].strip()}")
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
            if matcher.is_error():
                raise InvalidParameterError(spec.param, f"{spec.param} is invalid: {matcher.get_error()}")
            result: Any = matcher
        except InvalidParameterError as exc:
            result = exc  # cached too: the same bad input is refused at once next time
        except ValueError as exc:
            result = InvalidParameterError(spec.param, f"{spec.param} is invalid: {exc}")
        with self._lock:
            self._cache[spec] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def token_bytes(self, token_id: int) -> bytes | None:
        """A token's own bytes (part of a character, for some), or None without a fast tokenizer."""
        try:
            return bytes(self._llguidance_tokenizer().decode_bytes([token_id]))
        except InvalidParameterError:
            return None

    def _llguidance_tokenizer(self) -> Any:
        if self._lltokenizer is None:
            import llguidance.hf

            if getattr(self._tokenizer, "backend_tokenizer", None) is None:
                raise InvalidParameterError("response_format", "structured output needs a fast (Rust) tokenizer")
            with self._lock:
                if self._lltokenizer is None:
                    self._lltokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)
        return self._lltokenizer


def _grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for ``spec``."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if spec.kind == "json_schema":
        return str(LLMatcher.grammar_from_json_schema(spec.source, defaults=_JSON_OPTIONS))  # type: ignore[arg-type]
    if spec.kind == "json_object":
        return str(LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS))  # type: ignore[arg-type]
    if spec.kind == "regex":
        return str(LLMatcher.grammar_from_regex(spec.source))
    if spec.kind == "choice":
        # Each choice as a Lark string literal (JSON's escapes are Lark's).
        choices = json.loads(spec.source)
        return str(
            LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        )
    try:
        return str(LLMatcher.grammar_from_lark(any_to_lark(spec.source)))  # Lark as is; GBNF converted
    except Exception as exc:  # noqa: BLE001  # the converter's own error types
        raise InvalidParameterError(spec.param, f"{spec.param} is invalid: {exc}") from None


def build_controls(
    params: SamplingParams,
    tokenizer: Any,
    vocab_size: int,
    eos_token_ids: frozenset[int],
    matcher: Any = None,
) -> RowControls | None:
    """One row's controls, or None when the request needs none.

    Raises:
        InvalidParameterError: A token id outside the vocabulary (naming its parameter).
    """
    for name, ids in (
        ("stop_token_ids", params.stop_token_ids),
        ("allowed_token_ids", params.allowed_token_ids or ()),
        ("logit_bias", [token for token, _ in params.logit_bias]),
    ):
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            raise InvalidParameterError(
                name, f"{name} holds token ids outside the vocabulary of {vocab_size}: {bad[:5]}"
            )
    if not params.needs_controls:
        return None
    bias = params.logit_bias
    return RowControls(
        min_tokens=params.min_tokens,
        end_ids=tuple(sorted(end_ids(eos_token_ids, params))),  # the finish rule's: masked before min_tokens
        logit_bias=(tuple(t for t, _ in bias), tuple(b for _, b in bias)),
        bad_words=bad_word_ids(tokenizer, params.bad_words),
        allowed_ids=params.allowed_token_ids,
        processors=params.logits_processors,
        matcher=matcher,
    )


def bad_word_ids(tokenizer: Any, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Each word's token sequences, as it reads alone and after a space (as vLLM bans them)."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
            if ids:
                sequences[ids] = None
    return tuple(sequences)
