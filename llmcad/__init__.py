"""llmcad: run language models larger than memory, fast and exactly."""

from llmcad.errors import LlmcadError

__version__ = "0.1.0"
__all__ = ["LlmcadError", "__version__"]
