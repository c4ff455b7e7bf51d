"""tvmq graph passes: each a ``tvm.transform.Pass``, one per module."""

from .annotate import AnnotateQuantization
from .calibrate import Calibrate
from .realize import RealizeQuantization

__all__ = ["AnnotateQuantization", "Calibrate", "RealizeQuantization"]
