"""Where async_llm keeps what it makes once and reuses: converted models, start-up verdicts, the
native decode step (each in its own folder under :func:`cache_root`)."""

from __future__ import annotations

import os
import pathlib

import platformdirs

__all__ = ["CACHE_ENV_VAR", "cache_root"]

#: Environment variable that overrides the cache directory.
CACHE_ENV_VAR = "ASYNC_LLM_CACHE"


def cache_root() -> pathlib.Path:
    """Return the directory where async_llm keeps converted models and other cached files.

    Returns:
        ``$ASYNC_LLM_CACHE`` when that variable is set and non-empty, otherwise the platform's user
        cache directory for ``async_llm`` (for example ``~/.cache/async_llm`` on Linux). The
        directory is not created here.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path(platformdirs.user_cache_dir("async_llm"))
