"""Peers that run in interpreters of their own (vLLM's CPU build, llama.cpp through llama-cpp-python).

Each peer pins its own torch or none, so it lives in its own virtual environment. The files here
are scripts run by path with that environment's Python, importing only the standard library, the
peer and :mod:`_worker_io` (beside them); :class:`async_llm.bench.systems.ExternalRunner` drives
them over JSON lines on stdin/stdout. Nothing here is imported by the package.
"""
