"""snuggle: fast, memory-lean continued pretraining and LoRA fine-tuning of open decoder LLMs."""

from snuggle.errors import SnuggleError
from snuggle.load import load

__all__ = ["load", "SnuggleError", "__version__"]
__version__ = "0.1.0"
