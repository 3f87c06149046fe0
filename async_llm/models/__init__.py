"""Model back ends and model files: Hugging Face transformers models, GGUF conversion, the default model."""
