"""Model files: transformers folders and hub ids (``loading``), GGUF conversion (``gguf``) and the
embedded default model (``default``)."""
