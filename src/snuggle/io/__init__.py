"""Checkpoint formats: Hugging Face directories (`snuggle.io.hf`), llama.cpp GGUF files (`snuggle.io.gguf`).

The submodules are imported on demand so that reading one format never pays for the other's imports.
"""

__all__: list[str] = []
