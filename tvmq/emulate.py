"""Run aarch64 artifacts on an x86 machine under qemu-user, to check their numbers.

An aarch64 ``model.so`` needs an aarch64 TVM runtime to load it. The runtime libraries
come from the aarch64 wheels of the very TVM and tvm-ffi versions installed here
(``pip download``, once, into ``$TVMQ_CACHE_DIR/aarch64-runtime``), and a small C++
driver (``emulate_driver.cc``), cross-compiled once against the installed tvm-ffi
headers, creates the Relax VM, calls ``main`` and writes the outputs to files. The driver
runs under ``qemu-aarch64``; Debian's ``qemu-user`` and ``g++-aarch64-linux-gnu`` provide
the emulator, the cross compiler and the aarch64 C library (``make setup-system``).

Emulation checks numbers, not speed: qemu translates every instruction, so timings say
nothing about an ARM core. The emulated CPU model decides which instructions exist: an
artifact that uses ``sdot`` dies with SIGILL on ``cortex-a53``, which has no dotprod.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from importlib import metadata, resources
from typing import Any

import numpy as np

from .artifact import LIBRARY, check_members, read_manifest
from .errors import ArtifactError, ConfigError
from .frontend import TensorInfo
from .runtime import check_inputs

QEMU = "qemu-aarch64"
CROSS_CXX = "aarch64-linux-gnu-g++"
# Debian's aarch64 C library, which qemu-user needs to load the driver's dependencies.
SYSROOT = "/usr/aarch64-linux-gnu"
_SETUP = "install Debian's qemu-user and g++-aarch64-linux-gnu (make setup-system does)"

# Where each runtime library sits in its aarch64 wheel.
_RUNTIME_LIBRARIES = {
    "apache-tvm": ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so"),
    "apache-tvm-ffi": ("tvm_ffi/lib/libtvm_ffi.so",),
}
# Platform tags the aarch64 wheels are published under; pip takes the first that exists.
_WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
_DRIVER_SOURCE = "emulate_driver.cc"
# What the qemu CPU models offer, as /proc/cpuinfo flags ("max" offers everything).
_QEMU_CPU_FEATURES = {
    "cortex-a35": {"asimd"},
    "cortex-a53": {"asimd"},
    "cortex-a57": {"asimd"},
    "cortex-a72": {"asimd"},
    "cortex-a76": {"asimd", "asimddp"},
    "neoverse-n1": {"asimd", "asimddp"},
    "a64fx": {"asimd", "sve"},
}


class EmulatedModel:
    """An aarch64 artifact run under qemu-aarch64. Create with :func:`load_emulated`.

    Has the ``inputs``, ``outputs``, ``manifest`` and ``run`` of
    :class:`tvmq.runtime.Model`; there is no ``benchmark``, because timing under
    emulation measures qemu, not the model.
    """

    def __init__(self, manifest: dict[str, Any], library: bytes, source: str, cpu: str) -> None:
        self.manifest = manifest
        self.inputs = [TensorInfo.from_json(i) for i in manifest["inputs"]]
        self.outputs = [TensorInfo.from_json(o) for o in manifest["outputs"]]
        self.source = source
        self.cpu = cpu
        self._library = library

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model once under qemu; returns the outputs by name."""
        check_inputs(self.inputs, inputs)
        runtime = runtime_dir()
        driver = _driver(runtime)
        with tempfile.TemporaryDirectory(prefix="tvmq-emulate-") as work:
            library = os.path.join(work, LIBRARY)
            with open(library, "wb") as handle:
                handle.write(self._library)
            command = [
                QEMU, "-L", SYSROOT, "-cpu", self.cpu, "-E", f"LD_LIBRARY_PATH={runtime}",
                driver, library, work,
            ]
            for index, info in enumerate(self.inputs):
                path = os.path.join(work, f"in{index}.bin")
                np.ascontiguousarray(inputs[info.name]).tofile(path)
                command += [path, info.dtype, _dims(info.shape)]
            # cwd=work: a guest that dies of a signal leaves qemu's core file there.
            result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                                    preexec_fn=_no_core_files)
            self._check(result)
            return self._read_outputs(result.stdout, work)

    def _check(self, result: subprocess.CompletedProcess) -> None:
        if result.returncode == 0:
            return
        if result.returncode == -signal.SIGILL:
            needs = ", ".join(self.manifest.get("cpu_features", [])) or "nothing special"
            offers = _QEMU_CPU_FEATURES.get(self.cpu)
            cpu = f"'{self.cpu}' ({', '.join(sorted(offers))})" if offers else f"'{self.cpu}'"
            raise ArtifactError(
                f"'{self.source}' executed an instruction that the emulated CPU {cpu} does not "
                f"have (SIGILL); the artifact needs {needs}: emulate with cpu='max'"
            )
        if result.returncode < 0:
            name = signal.Signals(-result.returncode).name
            raise ArtifactError(
                f"'{self.source}' died with {name} under {QEMU} -cpu {self.cpu}; "
                "rerun it on an aarch64 machine and report the model"
            )
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        detail = (errors[-1].removeprefix("error: ") if errors else lines[-1] if lines
                  else f"exit status {result.returncode}")
        raise ArtifactError(
            f"running '{self.source}' under {QEMU} failed: {detail[:400]}; "
            "check that the artifact was built by this tvmq"
        )

    def _read_outputs(self, stdout: str, work: str) -> dict[str, np.ndarray]:
        written = [line.split() for line in stdout.splitlines() if line.startswith("out")]
        if len(written) != len(self.outputs):
            raise ArtifactError(
                f"'{self.source}' returned {len(written)} outputs under {QEMU} but its manifest "
                f"lists {len(self.outputs)}; rebuild the artifact"
            )
        outputs = {}
        for info, (name, dtype, dims) in zip(self.outputs, written, strict=True):
            if dtype != info.dtype or dims != _dims(info.shape):
                raise ArtifactError(
                    f"output '{info.name}' of '{self.source}' came back as {dtype} {dims} but "
                    f"the manifest says {info.dtype} {_dims(info.shape)}; rebuild the artifact"
                )
            path = os.path.join(work, f"{name}.bin")
            outputs[info.name] = np.fromfile(path, dtype=info.dtype).reshape(info.shape)
        return outputs


def load_emulated(path: str | os.PathLike, *, cpu: str = "max") -> EmulatedModel:
    """Open an aarch64 artifact for :meth:`EmulatedModel.run` under ``qemu-aarch64``.

    Parameters
    ----------
    path : path
        An artifact built for an aarch64 target (``aarch64``, ``aarch64-dotprod``).
    cpu : str
        The qemu CPU model (``qemu-aarch64 -cpu help``). ``"max"`` has every feature an
        artifact can need; ``"cortex-a53"`` has no dotprod, so ``sdot`` kernels die there.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ArtifactError(f"artifact '{source}' does not exist; build one with tvmq compile")
    if not tarfile.is_tarfile(source):
        raise ArtifactError(f"'{source}' is not a tvmq artifact (not a tar file)")
    with tarfile.open(source) as tar:
        check_members(tar, source)
        manifest = read_manifest(tar, source)
        _check_emulable(manifest, source)
        try:
            library = tar.extractfile(tar.getmember(LIBRARY)).read()
        except KeyError:
            raise ArtifactError(f"'{source}' has no {LIBRARY}; rebuild it") from None
    _check_tools()
    models = _qemu_cpus()
    if cpu not in models:
        raise ConfigError(
            f"'{cpu}' is not a {QEMU} CPU model; choose one of: {', '.join(models)}"
        )
    return EmulatedModel(manifest, library, source, cpu)


def run_emulated(
    artifact_path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    *,
    cpu: str = "max",
) -> dict[str, np.ndarray]:
    """Run an aarch64 artifact once under ``qemu-aarch64`` and return its outputs by name.

    The outputs have the names and order of :meth:`tvmq.runtime.Model.run`. The first call
    downloads the aarch64 TVM runtime from PyPI and cross-compiles the driver (cached).
    """
    return load_emulated(artifact_path, cpu=cpu).run(**inputs)


def cache_dir() -> str:
    """Where the aarch64 runtime and driver are kept: ``$TVMQ_CACHE_DIR/aarch64-runtime``."""
    root = os.environ.get("TVMQ_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tvmq"
    )
    return os.path.join(root, "aarch64-runtime")


def runtime_dir() -> str:
    """The folder holding the aarch64 runtime libraries for the installed TVM; fetched once."""
    versions = {package: metadata.version(package) for package in _RUNTIME_LIBRARIES}
    tag = "-".join(f"{package}-{version}" for package, version in versions.items())
    directory = os.path.join(cache_dir(), tag)
    wanted = [os.path.basename(f) for files in _RUNTIME_LIBRARIES.values() for f in files]
    with _locked(cache_dir()):
        if all(os.path.isfile(os.path.join(directory, name)) for name in wanted):
            return directory
        partial = tempfile.mkdtemp(prefix=".partial-", dir=cache_dir())
        os.chmod(partial, 0o755)
        try:
            _fetch_runtime(versions, partial)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(partial, directory)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def _fetch_runtime(versions: Mapping[str, str], into: str) -> None:
    wheels = os.path.join(into, "wheels")
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "-d", wheels]
    for platform in _WHEEL_PLATFORMS:
        command += ["--platform", platform]
    command += [f"{package}=={version}" for package, version in versions.items()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise ArtifactError(
            f"could not download the aarch64 TVM runtime ({', '.join(versions.values())}) "
            f"from PyPI: {lines[-1][:300]}; check the network or pip's index settings"
        )
    for wheel in os.listdir(wheels):
        package = wheel.split("-")[0].replace("_", "-")
        with zipfile.ZipFile(os.path.join(wheels, wheel)) as archive:
            for member in _RUNTIME_LIBRARIES.get(package, ()):
                with archive.open(member) as src, \
                        open(os.path.join(into, os.path.basename(member)), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    shutil.rmtree(wheels)


def _driver(runtime: str) -> str:
    """The cross-compiled driver for ``runtime``, built once per driver source."""
    source = resources.files("tvmq").joinpath(_DRIVER_SOURCE).read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    driver = os.path.join(runtime, f"driver-{digest}")
    with _locked(cache_dir()):
        if os.path.isfile(driver):
            return driver
        import tvm_ffi

        include = os.path.join(os.path.dirname(tvm_ffi.__file__), "include")
        with tempfile.TemporaryDirectory(prefix="tvmq-driver-") as work:
            cc = os.path.join(work, _DRIVER_SOURCE)
            with open(cc, "wb") as handle:
                handle.write(source)
            output = os.path.join(work, "driver")
            # --no-as-needed: nothing in the driver names libtvm_runtime, but loading it is
            # what registers the Relax VM and its builtins.
            command = [
                CROSS_CXX, "-std=c++17", "-O2", f"-I{include}", cc, "-o", output,
                f"-L{runtime}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_runtime_extra",
                "-ltvm_ffi",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line]
                first = (errors or result.stderr.strip().splitlines() or ["?"])[0]
                raise ArtifactError(
                    f"cross-compiling the emulation driver failed: {first[:300]}; "
                    f"check {CROSS_CXX} and the installed apache-tvm-ffi"
                )
            os.replace(output, driver)
    return driver


def _check_emulable(manifest: Mapping[str, Any], source: str) -> None:
    arch = manifest.get("arch")
    preset = manifest.get("target", {}).get("preset", "?")
    if arch != "aarch64":
        raise ArtifactError(
            f"artifact '{source}' is built for {arch} (target {preset}); emulation runs aarch64 "
            "artifacts: run this one without --emulate, or recompile with --target aarch64"
        )
    if manifest.get("device") != "cpu":
        raise ArtifactError(
            f"artifact '{source}' runs on {manifest.get('device')} (target {preset}); "
            "emulation runs CPU code only"
        )


def _check_tools() -> None:
    for tool in (QEMU, CROSS_CXX):
        if shutil.which(tool) is None:
            raise ArtifactError(f"{tool} is not installed; {_SETUP}")
    if not os.path.isfile(os.path.join(SYSROOT, "lib", "ld-linux-aarch64.so.1")):
        raise ArtifactError(f"the aarch64 C library is missing from {SYSROOT}; {_SETUP}")


def _qemu_cpus() -> list[str]:
    result = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return [line.split()[0] for line in lines[1:] if line.strip()]


def _dims(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape) if shape else "-"


def _no_core_files() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@contextlib.contextmanager
def _locked(directory: str):
    # Tests and the CLI may prepare the cache at the same time.
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
