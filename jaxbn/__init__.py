"""jaxbn: batch normalization for JAX as a pure function with explicit state."""

from ._batch_norm import batch_norm as batch_norm
from ._fold import fold_conv as fold_conv
from ._fold import fold_dense as fold_dense
from ._recalibrate import PooledStats as PooledStats
from ._recalibrate import RecalibrationState as RecalibrationState
from ._recalibrate import recalibrate as recalibrate
from ._recalibrate import recalibration_init as recalibration_init
from ._recalibrate import recalibration_result as recalibration_result
from ._recalibrate import recalibration_update as recalibration_update
from ._renorm import batch_renorm as batch_renorm
from ._state import BatchStats as BatchStats
from ._state import Params as Params
from ._state import init as init

__version__ = "0.2.0"

__all__ = [
    "BatchStats",
    "Params",
    "PooledStats",
    "RecalibrationState",
    "batch_norm",
    "batch_renorm",
    "fold_conv",
    "fold_dense",
    "init",
    "recalibrate",
    "recalibration_init",
    "recalibration_result",
    "recalibration_update",
]
