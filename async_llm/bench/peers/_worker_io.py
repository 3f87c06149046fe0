"""The worker side of the JSON-lines protocol shared by the peer scripts (standard library only).

suite -> worker   {"cmd": "run", "start": T, "requests": [{"index", "prompt_ids", "max_new_tokens",
                   "arrival", "after"}, ...]}   arrival: seconds after T (time.perf_counter, one clock
                                           for every process on the machine); with "after" (an
                                           index), seconds after that request finished
                  {"cmd": "stop"}
worker -> suite   {"ready": true} | {"error": "..."}    once, after loading
                  {"done": index, "token_times": [...], "sent": t | null} per finished request
                                           (sent: when a dependent request went out)
                  {"idle": true}                         after each run
                  {"failed": "..."}                      a run that raised
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

Done = Callable[..., None]  # (index, token_times, sent=None): sent is when a dependent request went out
RunFn = Callable[[float, list[dict[str, Any]], Done], None]


_PROTOCOL: Any = None  # the original stdout, kept for the protocol alone (see serve)


def _send(message: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


def serve(load: Callable[[dict[str, Any]], RunFn]) -> None:
    """Load the peer with the JSON config in ``argv[1]``, then answer runs until told to stop.

    The peer's own prints go to stderr: stdout carries the protocol only.
    """
    global _PROTOCOL
    config = json.loads(sys.argv[1])
    # The protocol gets a private copy of stdout; file descriptor 1 itself then points at stderr, so
    # whatever else writes there (C code, the peer's own child processes) cannot corrupt it.
    _PROTOCOL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        run = load(config)
    except Exception as exc:  # noqa: BLE001  # reported to the suite as the reason the peer cannot run
        traceback.print_exc()
        _send({"error": f"{type(exc).__name__}: {exc}"})
        return
    _send({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] != "run":
            break
        try:
            run(
                command["start"],
                command["requests"],
                lambda index, times, sent=None: _send({"done": index, "token_times": times, "sent": sent}),
            )
        except Exception as exc:  # noqa: BLE001  # the run's error, reported; the worker keeps serving
            traceback.print_exc()
            _send({"failed": f"{type(exc).__name__}: {exc}"})
        _send({"idle": True})
