"""subspaces: train lines, curves and simplexes of neural networks (mode connectivity, [W], [B])."""

from .bn import batchnorm_modules, update_bn
from .regularizers import cosine_penalty, log_volume
from .shapes import Bezier, Line, PolyChain, Simplex, check_same_architecture
from .subspace import Subspace

__all__ = [
    "Bezier",
    "Line",
    "PolyChain",
    "Simplex",
    "Subspace",
    "batchnorm_modules",
    "check_same_architecture",
    "cosine_penalty",
    "log_volume",
    "update_bn",
]

__version__ = "0.1.0"
