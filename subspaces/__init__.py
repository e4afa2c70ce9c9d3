"""subspaces: train lines, curves and simplexes of neural networks (mode connectivity, [W], [B])."""

from .bn import batchnorm_modules, update_bn
from .ensembles import Ensemble, evaluate, load_ensemble, subspace_ensemble, subspace_points
from .regularizers import cosine_penalty, log_volume
from .shapes import Bezier, Line, PolyChain, Simplex, check_same_architecture
from .snapshots import list_snapshots, load_optimizer_state, swa_average, train_snapshots
from .subspace import Subspace

__all__ = [
    "Bezier",
    "Ensemble",
    "Line",
    "PolyChain",
    "Simplex",
    "Subspace",
    "batchnorm_modules",
    "check_same_architecture",
    "cosine_penalty",
    "evaluate",
    "list_snapshots",
    "load_ensemble",
    "load_optimizer_state",
    "log_volume",
    "subspace_ensemble",
    "subspace_points",
    "swa_average",
    "train_snapshots",
    "update_bn",
]

__version__ = "0.1.0"

from .pointwise import (  # noqa: E402
    at_coefficients,
    bn_statistics,
    evaluate_coefficients,
    evaluate_points,
    export_coefficients,
    point_coefficients,
)

__all__ += [
    "at_coefficients",
    "bn_statistics",
    "evaluate_coefficients",
    "evaluate_points",
    "export_coefficients",
    "point_coefficients",
]
