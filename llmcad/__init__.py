"""llmcad: run language models larger than memory, fast and exactly."""

import os

# The native kernels' threads and PyTorch's OpenMP threads take turns on the same cores; an
# OpenMP thread spinning after its last parallel region holds a core the next matmul needs
# (the 1.5B target on 2 cores: 5.5 s for 32 tokens spinning, 3.7 s passive). Set before
# PyTorch starts OpenMP, so it applies where llmcad is imported first (the CLI, the server).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llmcad.engine import Engine
from llmcad.errors import LlmcadError
from llmcad.generate import Generation, Piece

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "LlmcadError", "Piece", "__version__"]
