"""jaxbn: batch normalization for JAX as a pure function with explicit state."""

from ._batch_norm import batch_norm as batch_norm
from ._state import BatchStats as BatchStats
from ._state import Params as Params
from ._state import init as init

__version__ = "0.1.0"

__all__ = ["BatchStats", "Params", "batch_norm", "init"]
