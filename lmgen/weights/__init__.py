"""Readers that turn model files (Hugging Face folders, GGUF) into a config dict and tensors."""
