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

from . import runtime  # noqa: E402
from .build import compile  # noqa: E402
from .config import CompileConfig, QuantizeMode  # noqa: E402
from .errors import TvmqError  # noqa: E402
from .frontend import load  # noqa: E402
from .pipeline import pipeline  # noqa: E402

__all__ = [
    "CompileConfig",
    "QuantizeMode",
    "TvmqError",
    "__version__",
    "compile",
    "load",
    "pipeline",
    "runtime",
]
