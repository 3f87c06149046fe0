"""Model files: transformers folders and hub ids (``loading``), what a ``model_id`` names, checked
before anything loads (``paths``), GGUF conversion (``gguf``), the embedded default model
(``default``), loads without progress bars (``quiet``) and the start-up checks' stored verdicts
(``check_cache``)."""
