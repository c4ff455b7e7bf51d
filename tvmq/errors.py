"""The exceptions tvmq raises for bad input.

Every message is one line that names the thing involved and says what to do. The CLI
prints ``str(error)`` and exits 1; anything that is not a ``TvmqError`` is a bug in tvmq.
"""


class TvmqError(Exception):
    """Base class of every user-facing tvmq error."""


class ModelError(TvmqError):
    """The model file is missing, unreadable or not something tvmq can import."""


class UnsupportedOpError(ModelError):
    """The model uses operators the Relax ONNX importer cannot convert."""


class InputError(TvmqError):
    """An input name, shape, dtype or value does not match the model."""


class TargetError(TvmqError):
    """An unknown target preset or an unusable target description."""


class ConfigError(TvmqError):
    """An invalid option or combination of options."""


class PipelineError(TvmqError):
    """A pass name that is not in the pipeline, or a pass that failed."""


class ArtifactError(TvmqError):
    """An artifact that is missing, malformed, unsafe or built for another machine."""


class CalibrationError(TvmqError):
    """Calibration data that does not fit the model."""


class NotBuiltError(TvmqError):
    """A feature that this version of tvmq does not provide yet."""


class TuningError(TvmqError):
    """A tuning run that cannot start or go on, or a tuning records directory it cannot use."""


def _register_with_tvm_ffi() -> None:
    # Errors raised inside a pass cross TVM's FFI; registered, they come back as themselves
    # instead of a RuntimeError, so the CLI still reports them as one-line user errors.
    import tvm_ffi

    pending = [TvmqError]
    while pending:
        cls = pending.pop()
        tvm_ffi.register_error(cls.__name__, cls)
        pending.extend(cls.__subclasses__())


_register_with_tvm_ffi()
