"""Seeded, reproducible workloads: what is sent, when, and how many tokens each request must produce.

A workload is a list of :class:`RequestSpec` (arrival offset, prompt text, its token ids, exact number
of new tokens). Every system gets the same token ids: prompts are built so that ``tokenizer(text)``
gives back exactly ``prompt_ids`` (the ids async_llm sees for raw text, ``chat_template=False``), and
the transformers-based systems are fed those ids directly.

Kinds:
  * burst: N requests all at t=0, a fixed prompt set, exactly ``new_tokens`` each (eos ignored);
  * mixed: Poisson arrivals at ``rate`` requests/s, prompt and output lengths drawn from a bounded
    Pareto distribution (long tail: most requests short, a few long);
  * grounded: N requests all at t=0 whose answers copy spans of their prompts (rewrite code, fix a
    paragraph, extract fields, quote a text; :data:`GROUNDED_PROMPTS`, in the model's chat
    template), where n-gram speculation helps, beside the open-ended bursts where it does not;
  * the prefill workloads (:data:`PREFILL_KINDS`), for the prefix cache and chunked prefill:
    chat (conversations whose every turn resends the whole history, a turn sent when the previous
    one finished), shared-prefix (concurrent requests behind one long system prompt) and
    long-prompt (streams decoding when a very long prompt arrives).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The burst prompt set (raw text, no chat template): request i gets "Request i: " + BURST_PROMPTS[i % 8].
#: The prefix keeps every prompt distinct, as concurrent users' prompts are: identical prompts would let
#: a system prefill one row for several requests (async_llm and transformers' CB both can).
BURST_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain continuous batching in one paragraph.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short recipe for pancakes.",
    "What is 17 times 23?",
)

#: The grounded workload's requests (user messages; the answer copies most of the text given).
GROUNDED_PROMPTS: tuple[str, ...] = (
    "Repeat the following paragraph word for word:\n\nThe lighthouse stood on the edge of the cliff for more "
    "than two hundred years. Every night its keeper climbed the narrow stairs, lit the great lamp and watched the "
    "ships pass safely along the rocky coast. When the storms came, the keeper stayed awake until morning, and "
    "the light never went out.",
    "Extract the name, the city, the date and the amount from this message as JSON with the keys name, city, "
    "date and amount:\n\nDear support team, my name is Alice Martin and I live in Lyon. On 12 March 2024 I "
    "paid 249.99 euros for a blue bicycle, order number 58213, but the bicycle I received is red. "
    "Please send me the blue bicycle, or refund the 249.99 euros to my card. Alice Martin, Lyon.",
    "Convert this sentence to title case and repeat it: the quick brown fox jumps over the lazy dog near the "
    "river bank on a sunny afternoon in early spring, while the farmer watches from the old wooden bridge.",
    "Rewrite this Python function with the variable `total` renamed to `running`. Reply with the full code.\n\n"
    "def moving_average(values, window):\n    total = sum(values[:window])\n    averages = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        averages.append(total / window)\n    return averages\n",
)

#: Tokens each grounded request generates: about its answer's length. The default model's greedy
#: answers run 27 to 59 tokens before their end-of-sequence (the paragraph repeated word for word is
#: 59), and the bench ignores end-of-sequence so that every system generates the same count: a
#: budget of 128 spent over half of grounded-1 on text past the answer's end (a new conversation
#: the model invents), which measures open-ended decoding, not copying.
GROUNDED_NEW_TOKENS = 64

#: Shape of the bounded Pareto for mixed lengths: 1.0 puts the median near 2x the minimum and the
#: mean near 3.5x, with a tail up to the maximum (roughly what chat traffic looks like).
PARETO_ALPHA = 1.0


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload.

    Attributes:
        index: Position in the workload (stable id across systems).
        arrival: Seconds after the start of the run at which the request is sent.
        text: The prompt as raw text (what async_llm receives).
        prompt_ids: ``tokenizer(text).input_ids``: what every system prefills.
        max_new_tokens: Exact number of tokens to generate (eos ignored).
        after: The index of a request that must finish first (then ``arrival`` counts from then).
        tag: The request's part in its workload's own figures (see ``metrics.summarise``).
    """

    index: int
    arrival: float
    text: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    #: Send only when request ``after`` has finished, ``arrival`` seconds later (a conversation's next turn).
    after: int | None = None
    #: What the request is to its workload's own figures ("last" turn, "long" prompt, "stream").
    tag: str = ""


@dataclass
class Workload:
    """A named list of requests plus the parameters that produced it (reported in the JSON)."""

    name: str
    kind: str  # "burst" or "mixed"
    requests: list[RequestSpec]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def concurrency(self) -> int | None:
        """N of a burst workload (all requests at once); ``None`` for a mixed one."""
        return len(self.requests) if self.kind in ("burst", "grounded") else None

    def describe(self) -> dict[str, Any]:
        """Parameters and length statistics, JSON-ready."""
        prompts = [len(r.prompt_ids) for r in self.requests]
        outputs = [r.max_new_tokens for r in self.requests]
        return {
            "name": self.name,
            "kind": self.kind,
            "num_requests": len(self.requests),
            **self.params,
            "prompt_tokens": _stats(prompts),
            "output_tokens": _stats(outputs),
            "total_output_tokens": sum(outputs),
            "last_arrival_s": round(max((r.arrival for r in self.requests), default=0.0), 3),
        }


def _stats(values: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "mean": round(sum(ordered) / len(ordered), 1),
        "max": ordered[-1],
    }


def encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Ids of raw ``text`` exactly as async_llm computes them with ``chat_template=False``."""
    return tuple(tokenizer(text).input_ids)


def burst_workload(tokenizer: Any, concurrency: int, new_tokens: int) -> Workload:
    """``concurrency`` distinct requests at t=0 over the fixed prompt set, ``new_tokens`` each."""
    if concurrency < 1 or new_tokens < 1:
        raise ValueError("concurrency and new_tokens must be >= 1")
    requests = []
    for i in range(concurrency):
        text = f"Request {i}: {BURST_PROMPTS[i % len(BURST_PROMPTS)]}"
        requests.append(RequestSpec(i, 0.0, text, encode(tokenizer, text), new_tokens))
    return Workload(f"burst-{concurrency}", "burst", requests, {"concurrency": concurrency, "new_tokens": new_tokens})


def grounded_workload(tokenizer: Any, concurrency: int, new_tokens: int = GROUNDED_NEW_TOKENS) -> Workload:
    """``concurrency`` requests at t=0 over :data:`GROUNDED_PROMPTS`, each rendered with the model's
    chat template into raw text (its ids are what every system prefills), ``new_tokens`` each."""
    if concurrency < 1 or new_tokens < 1:
        raise ValueError("concurrency and new_tokens must be >= 1")
    requests = []
    for i in range(concurrency):
        message = GROUNDED_PROMPTS[i % len(GROUNDED_PROMPTS)]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = message
        requests.append(RequestSpec(i, 0.0, text, encode(tokenizer, text), new_tokens))
    params = {"concurrency": concurrency, "new_tokens": new_tokens}
    return Workload(f"grounded-{concurrency}", "grounded", requests, params)


def bounded_pareto(rng: random.Random, low: int, high: int, alpha: float = PARETO_ALPHA) -> int:
    """An integer in [low, high] from a bounded Pareto distribution (inverse-CDF sampling)."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    if low == high:
        return low
    u = rng.random()
    ratio = (low / high) ** alpha
    x = low / (1.0 - u * (1.0 - ratio)) ** (1.0 / alpha)
    return max(low, min(high, int(math.floor(x))))


def mixed_workload(
    tokenizer: Any,
    num_requests: int,
    rate: float,
    seed: int,
    prompt_range: tuple[int, int] = (16, 512),
    output_range: tuple[int, int] = (8, 256),
) -> Workload:
    """Poisson arrivals at ``rate`` requests/s with long-tailed prompt and output lengths.

    Args:
        tokenizer: The model's tokenizer (prompts are built to exact token counts with it).
        num_requests: How many requests the run sends.
        rate: Mean arrival rate (requests/s); inter-arrival gaps are exponential.
        seed: Seeds arrivals, lengths and prompt words: the same seed gives the same workload.
        prompt_range, output_range: Inclusive token-count bounds.

    Raises:
        ValueError: Non-positive counts, rate or bounds.
    """
    if num_requests < 1 or rate <= 0:
        raise ValueError("num_requests must be >= 1 and rate > 0")
    rng = random.Random(seed)
    words = PromptBuilder(tokenizer, seed)
    requests = []
    t = 0.0
    for i in range(num_requests):
        if i:
            t += rng.expovariate(rate)
        n_prompt = bounded_pareto(rng, *prompt_range)
        n_out = bounded_pareto(rng, *output_range)
        text, ids = words.prompt(n_prompt, rng)
        requests.append(RequestSpec(i, round(t, 6), text, ids, n_out))
    params = {
        "rate": rate,
        "seed": seed,
        "prompt_range": list(prompt_range),
        "output_range": list(output_range),
        "length_distribution": f"bounded Pareto, alpha={PARETO_ALPHA}",
    }
    return Workload("mixed", "mixed", requests, params)


class PromptBuilder:
    """Builds prompt text of an exact token count from words that are one token each.

    Words are vocabulary entries that decode to ``" word"`` (a leading space, letters only) and encode
    back to that single id; byte-level and SentencePiece tokenizers split text on spaces before
    merging, so n such words are n tokens. A final check adds or drops words until the count matches;
    if a tokenizer has too few such words, the count may be off by a little (the ids are still exact).
    """

    def __init__(self, tokenizer: Any, seed: int, max_words: int = 2000) -> None:
        self._tokenizer = tokenizer
        self._special = len(encode(tokenizer, "a")) - len(tokenizer("a", add_special_tokens=False).input_ids)
        self.words = self._find_words(random.Random(seed), max_words)

    def _find_words(self, rng: random.Random, max_words: int) -> list[str]:
        vocab = self._tokenizer.get_vocab()
        ids = sorted(vocab.values())
        rng.shuffle(ids)
        words: list[str] = []
        for token_id in ids:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if not isinstance(piece, str) or piece[:1] not in ("Ġ", "▁") or not piece[1:].isascii():
                continue
            if not piece[1:].isalpha() or len(piece) < 3:
                continue
            text = self._tokenizer.decode([token_id])
            if self._tokenizer(text, add_special_tokens=False).input_ids == [token_id]:
                words.append(text)
                if len(words) >= max_words:
                    break
        if len(words) < 8:  # a tiny or unusual vocabulary: plain letters still make valid text
            words = [" " + c for c in "abcdefghijklmnopqrstuvwxyz"]
        return words

    def prompt(self, n_tokens: int, rng: random.Random) -> tuple[str, tuple[int, ...]]:
        """Text of ``n_tokens`` tokens (special tokens included) and its ids."""
        target = max(1, n_tokens - self._special)
        chosen = [rng.choice(self.words) for _ in range(target)]
        text = "".join(chosen)  # keeps the first word's space: it is what makes it one token
        ids = encode(self._tokenizer, text)
        for _ in range(64):  # converge on the exact count (rarely needed)
            if len(ids) == n_tokens:
                break
            if len(ids) > n_tokens and len(chosen) > 1:
                chosen.pop()
            else:
                chosen.append(rng.choice(self.words))
            text = "".join(chosen)
            ids = encode(self._tokenizer, text)
        return text, ids


#: Workload kinds that measure the prefill's reuse and chunking (see :func:`prefill_workloads`).
PREFILL_KINDS = frozenset({"chat", "shared-prefix", "long-prompt"})


def _ids_text(tokenizer: Any, pieces: Sequence[tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """Token pieces (each from :class:`PromptBuilder`, words of one token each) joined: their ids
    concatenated, and the text that encodes to exactly those ids."""
    ids = tuple(t for piece in pieces for t in piece)
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text, encode(tokenizer, text)


def chat_workload(
    tokenizer: Any,
    conversations: int = 8,
    turns: int = 6,
    seed: int = 0,
    new_tokens: int = 32,
    sizes: tuple[int, int, int] = (100, 180, 60),
) -> Workload:
    """``conversations`` conversations of ``turns`` turns, each turn resending the whole history
    (a 100-token system prompt, then per turn a 180-token question and a fixed 60-token answer: about
    1,500 tokens by the last turn). A turn is sent when the previous turn of its conversation has
    finished; conversations start 0.1 s apart. The last turns are tagged ``"last"``. ``sizes``: the
    token counts of the system prompt, a question and an answer."""
    rng = random.Random(seed)
    words = PromptBuilder(tokenizer, seed)
    system_size, question, answer = sizes
    system = encode_plain(tokenizer, words.prompt(system_size, rng)[0])
    requests: list[RequestSpec] = []
    for c in range(conversations):
        history = [system]
        previous = None
        for turn in range(turns):
            history.append(encode_plain(tokenizer, words.prompt(question, rng)[0]))
            text, ids = _ids_text(tokenizer, history)
            tag = "last" if turn == turns - 1 else ""
            arrival = 0.1 * c if previous is None else 0.0
            requests.append(RequestSpec(len(requests), arrival, text, ids, new_tokens, previous, tag))
            previous = len(requests) - 1
            history.append(encode_plain(tokenizer, words.prompt(answer, rng)[0]))  # the turn's (fixed) answer
    params = {"conversations": conversations, "turns": turns, "new_tokens": new_tokens, "seed": seed}
    return Workload("chat", "chat", requests, params)


def encode_plain(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Ids of ``text`` without special tokens (a piece of a longer prompt)."""
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def shared_prefix_workload(
    tokenizer: Any, requests: int = 16, prefix_tokens: int = 1000, seed: int = 0, new_tokens: int = 32
) -> Workload:
    """``requests`` requests at t=0, each the same ``prefix_tokens``-token system prompt followed by a
    question of its own (24 tokens)."""
    rng = random.Random(seed)
    words = PromptBuilder(tokenizer, seed)
    system = encode_plain(tokenizer, words.prompt(prefix_tokens, rng)[0])
    specs = []
    for i in range(requests):
        text, ids = _ids_text(tokenizer, [system, encode_plain(tokenizer, words.prompt(24, rng)[0])])
        specs.append(RequestSpec(i, 0.0, text, ids, new_tokens))
    params = {"requests": requests, "prefix_tokens": prefix_tokens, "new_tokens": new_tokens, "seed": seed}
    return Workload("shared-prefix", "shared-prefix", specs, params)


def long_prompt_workload(
    tokenizer: Any,
    streams: int = 8,
    prompt_tokens: int = 4000,
    seed: int = 0,
    stream_tokens: int = 512,
    arrival: float = 2.0,
) -> Workload:
    """``streams`` short requests decoding ``stream_tokens`` tokens each from t=0 (tagged
    ``"stream"``), and one ``prompt_tokens``-token prompt arriving at ``arrival`` s (tagged
    ``"long"``, 8 new tokens): how much the long prefill slows the running streams."""
    rng = random.Random(seed)
    words = PromptBuilder(tokenizer, seed)
    specs = []
    for i in range(streams):
        text, ids = words.prompt(24, rng)
        specs.append(RequestSpec(i, 0.0, text, ids, stream_tokens, tag="stream"))
    text, ids = words.prompt(prompt_tokens, rng)
    specs.append(RequestSpec(streams, arrival, text, ids, 8, tag="long"))
    params = {
        "streams": streams,
        "long_prompt_tokens": prompt_tokens,
        "stream_tokens": stream_tokens,
        "long_prompt_arrival_s": arrival,
        "seed": seed,
    }
    return Workload("long-prompt", "long-prompt", specs, params)


def prefill_workloads(tokenizer: Any, seed: int = 0, scale: float = 1.0) -> list[Workload]:
    """The chat, shared-prefix and long-prompt workloads at their documented sizes (prompt lengths
    and the streams' outputs times ``scale``: smaller for smoke tests)."""

    def n(tokens: int) -> int:
        return max(4, int(tokens * scale))

    return [
        chat_workload(tokenizer, seed=seed, sizes=(n(100), n(180), n(60))),
        shared_prefix_workload(tokenizer, prefix_tokens=n(1000), seed=seed),
        long_prompt_workload(
            tokenizer, prompt_tokens=n(4000), seed=seed, stream_tokens=max(200, n(512)), arrival=2.0 * min(scale, 1.0)
        ),
    ]


def build_workloads(
    tokenizer: Any,
    concurrency: Sequence[int],
    new_tokens: int,
    mixed_requests: int,
    rate: float,
    seed: int,
    prompt_range: tuple[int, int] = (16, 512),
    output_range: tuple[int, int] = (8, 256),
    grounded: Sequence[int] = (),
) -> list[Workload]:
    """Burst workloads for each concurrency level, the grounded ones for each of ``grounded``, then
    the mixed workload (skipped when 0 requests)."""
    workloads = [burst_workload(tokenizer, n, new_tokens) for n in concurrency]
    workloads += [grounded_workload(tokenizer, n) for n in grounded]
    if mixed_requests > 0:
        workloads.append(mixed_workload(tokenizer, mixed_requests, rate, seed, prompt_range, output_range))
    return workloads
