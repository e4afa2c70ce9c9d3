"""subspaces: train lines, curves and simplexes of neural networks (mode connectivity, [W], [B])."""

from .bn import batchnorm_modules, update_bn
from .complex import SimplicialComplex
from .ensembles import Ensemble, evaluate, load_ensemble, subspace_ensemble, subspace_points
from .pointwise import (
    at_coefficients,
    bn_statistics,
    evaluate_coefficients,
    evaluate_points,
    export_coefficients,
    point_coefficients,
)
from . import methods  # noqa: F401  (registers the built-in compared methods before any plugin's)
from .method_registry import CompareMethod, Member, RowName, method_names, register_method
from .regularizers import cosine_penalty, log_volume
from .shape_registry import ShapeParam, get_shape, register_shape, shape_names
from .shapes import Bezier, Line, PolyChain, Simplex, check_same_architecture
from .snapshots import list_snapshots, load_optimizer_state, swa_average, train_snapshots
from .subspace import Subspace, layout_for
from .settings import (
    ComplexConfig,
    CompareConfig,
    ConnectConfig,
    DataConfig,
    FGEConfig,
    ModelConfig,
    RunConfig,
    SPROConfig,
    SSEConfig,
    SubspaceConfig,
    TrainConfig,
    TrainRunConfig,
)
from .training import Trainer, run_training

__all__ = [
    "SimplicialComplex",
    "layout_for",
    "Bezier",
    "Ensemble",
    "Line",
    "PolyChain",
    "Simplex",
    "Subspace",
    "ShapeParam",
    "get_shape",
    "register_shape",
    "shape_names",
    "CompareMethod",
    "Member",
    "RowName",
    "method_names",
    "register_method",
    "CompareConfig",
    "ComplexConfig",
    "ConnectConfig",
    "DataConfig",
    "FGEConfig",
    "ModelConfig",
    "RunConfig",
    "SPROConfig",
    "SSEConfig",
    "SubspaceConfig",
    "TrainConfig",
    "TrainRunConfig",
    "Trainer",
    "at_coefficients",
    "batchnorm_modules",
    "bn_statistics",
    "check_same_architecture",
    "cosine_penalty",
    "evaluate",
    "evaluate_coefficients",
    "evaluate_points",
    "export_coefficients",
    "list_snapshots",
    "load_ensemble",
    "load_optimizer_state",
    "log_volume",
    "point_coefficients",
    "subspace_ensemble",
    "subspace_points",
    "swa_average",
    "train_snapshots",
    "run_training",
    "update_bn",
]

__version__ = "0.1.0"
