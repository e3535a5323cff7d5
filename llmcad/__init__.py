"""llmcad: run language models larger than memory, fast and exactly."""

from llmcad.engine import Engine
from llmcad.errors import LlmcadError
from llmcad.generate import Generation, Piece

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "LlmcadError", "Piece", "__version__"]
