"""The ``async-llm`` command's arguments: parsing them imports nothing of the library's heavy parts
(torch, transformers, the web server), so ``--help`` and a mistyped argument answer at once."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from async_llm.arg_types import add_runner_args, positive_int
from async_llm.param_names import QUANTIZE_MODES

__all__ = ["ENGINE_FLAGS", "UsageError", "build_parser", "deadline_defaults", "engine_kwargs"]

# The serve command's body limits, shown in --help (async_llm.serve.limits holds the values; importing
# it here would import FastAPI for every command; tests/test_new_user.py checks these agree).
MAX_BODY_HELP, BODY_TIMEOUT_HELP = "4 MiB", "30"

#: The engine's flags (every command that loads a model has them), each the ``HuggingFaceLLM``
#: keyword argument of the same name; None (a flag not given) is the library's default.
ENGINE_FLAGS = (
    "max_batch_size", "runner", "max_model_len", "gpu_memory_utilization", "kv_cache_bytes", "cuda_graphs", "overlap",
    "quantize", "speculative_config", "scheduling_policy", "max_queue_tokens",
)  # fmt: skip


class UsageError(Exception):
    """Bad command-line arguments (argparse would otherwise print usage and call sys.exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse hook: raise instead of print + exit
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``async-llm`` command.

    Returns:
        The parser; its ``command`` attribute names the chosen subcommand.
    """
    parser = _Parser(prog="async-llm", description="Run causal LMs with continuous batching and streaming.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    demo = commands.add_parser("demo", help="stream several different prompts at once through one model")
    _add_model_args(demo)
    demo.add_argument("--requests", type=positive_int, default=6, help="number of concurrent requests (default 6)")
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens per answer at most (default 96)")
    demo.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    demo.add_argument("--plain", action="store_true", help="print deltas as lines even on a terminal")

    gen = commands.add_parser("generate", help="stream the answer to one prompt to stdout")
    gen.add_argument("prompt", help="the prompt (the user message when a chat template is used)")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the library's)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--system-prompt", default=None, help="system message for the chat template")
    gen.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", help="send the prompt as raw text"
    )

    _add_serve_parser(commands)

    batch = commands.add_parser("batch", help="run an OpenAI Batch API file (JSONL) through one engine")
    batch.add_argument("-i", "--input", required=True, help="request lines: custom_id, method, url, body")
    batch.add_argument("-o", "--output", required=True, help="result lines (appended; a rerun skips what is there)")
    batch.add_argument("--error-file", default=None, help="failed lines (default: <output>.errors.jsonl)")
    batch.add_argument("--window", type=positive_int, default=None, help="requests in flight (default: the engine's)")
    batch.add_argument(
        "--served-model-name", default=None, help="the model name bodies may give (default: the model's)"
    )
    batch.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    _add_model_args(batch)

    # Listed for --help only: main() hands `bench ...` to the suite's own parser (async-llm bench --help).
    commands.add_parser("bench", help="benchmark suite against transformers and peers (async-llm bench --help)")
    return parser


def _add_serve_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--api-key", default=None, help="require this bearer key (default: $ASYNC_LLM_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's)")
    # Defaults None: serve_http fills in async_llm.serve.limits' values.
    srv.add_argument(
        "--max-body-bytes", type=positive_int, default=None,
        help=f"larger request bodies get 413 (default {MAX_BODY_HELP})",
    )  # fmt: skip
    srv.add_argument(
        "--body-timeout", type=_positive_float, default=None,
        help=f"seconds a request body may take to arrive, else 408 (default {BODY_TIMEOUT_HELP})",
    )  # fmt: skip
    srv.add_argument(
        "--limit-concurrency", type=positive_int, default=None,
        help="open connections at most; more get 503 from uvicorn (default: no limit)",
    )  # fmt: skip
    srv.add_argument(
        "--reject-unknown-fields", action="store_true",
        help="answer 400 to request fields the server does not know (default: ignore and log them)",
    )  # fmt: skip
    for flag, name, what in (
        ("--request-timeout", "timeout", "from submission to the last token (504)"),
        ("--queue-timeout", "queue_timeout", "waiting for a row (408)"),
        ("--stall-timeout", "stall_timeout", "without a new token once running (504)"),
    ):
        srv.add_argument(
            flag, dest=name, type=_positive_float, default=None,
            help=f"default seconds a request may take {what}; a request's own field wins (default: no limit)",
        )  # fmt: skip
    srv.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve (needs async-llm[ray])")
    srv.add_argument("--replicas", type=positive_int, default=1, help="engines with --ray (default 1)")
    srv.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    srv.add_argument(
        "--max-replicas", type=positive_int, default=None,
        help="with --ray: autoscale between --replicas and this many engines on their queues (default: fixed)",
    )  # fmt: skip
    srv.add_argument(
        "--routing", choices=("prefix", "power_of_two"), default=None,
        help="with --ray: send a prompt prefix to the replica that has it cached (prefix, the default), "
        "or use Ray Serve's default router (power_of_two)",
    )  # fmt: skip


def deadline_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The server's default deadlines (``--request-timeout`` and the others), as sampling defaults."""
    names = ("timeout", "queue_timeout", "stall_timeout")
    return {name: value for name in names if (value := getattr(args, name, None)) is not None}


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's options among the parsed arguments, as ``HuggingFaceLLM`` keyword arguments."""
    return {name: getattr(args, name) for name in ENGINE_FLAGS}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps (default: best)")
    parser.add_argument(
        "--max-batch-size", type=positive_int, default=None,
        help="rows decoded together (default: 32 on a CPU; with the static runner, as many as the KV budget "
        "holds, up to 256)",
    )  # fmt: skip
    add_runner_args(
        parser, "static runner: most prompt + output tokens per request (default: the model's context, at most 8192)"
    )
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="static runner: capture decode as CUDA graphs (default: on with CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=QUANTIZE_MODES, default=None,
        help="int8: layer products with int8 weights and rows quantized on the fly, on a CPU (about 0.7%% of "
        "perplexity on the default model; default: the model's dtype)",
    )  # fmt: skip
    parser.add_argument(
        "--max-queue-tokens", type=positive_int, default=None,
        help="most prompt + max_tokens tokens waiting for a row; more get 429 (default: 8 KV stores' worth with "
        "the static runner, no bound otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--scheduling-policy", choices=("fcfs", "priority"), default=None,
        help="fcfs (default), or priority: requests by their priority (lower first), more urgent ones preempting",
    )  # fmt: skip
    parser.add_argument(
        "--speculative-config", type=_json_object, default=None,
        help='n-gram speculative decoding, as JSON: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        "(vLLM's keys; default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=None,
        help="handle a decode step's tokens while the device runs the next (default: static runner on CUDA)",
    )  # fmt: skip


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
