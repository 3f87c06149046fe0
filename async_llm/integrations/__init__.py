"""Adapters that put the in-process engine where apps already live (LangChain, ...).

Each adapter is a module of its own behind an optional extra (``pip install 'async-llm[langchain]'``),
imported only when asked for.
"""
