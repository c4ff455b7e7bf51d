"""tvmq: quantize, optimize, tune and profile models with Apache TVM (Relax).

The Python API::

    mod = tvmq.load("model.onnx")                       # Relax IRModule, static shapes
    passes = tvmq.pipeline("x86")                       # the passes the build runs
    artifact = tvmq.compile("model.onnx", target="x86")
    artifact.export("model.tar")
    model = tvmq.runtime.load("model.tar")              # load only artifacts you trust
    outputs = model.run(input=x)
"""

__version__ = "0.1.0"

from . import runtime
from .build import compile
from .config import CompileConfig, QuantizeMode
from .errors import TvmqError
from .frontend import load
from .pipeline import pipeline
from .qconfig import QConfig
from .quantize import QuantizationReport, quantize
from .threads import use_every_core

# Before any kernel runs: TVM would otherwise use half the cores of a machine without SMT.
use_every_core()

__all__ = [
    "CompileConfig",
    "QConfig",
    "QuantizationReport",
    "QuantizeMode",
    "TvmqError",
    "__version__",
    "compile",
    "load",
    "pipeline",
    "quantize",
    "runtime",
]
