"""The artifact: one tar holding the compiled library and a JSON manifest.

Layout of the tar (regular files only, no directories, no links)::

    manifest.json   what the library is: inputs, outputs, target, versions, choices
    model.so        the Relax VM executable, exported as a shared library

Export writes to a temporary file beside the destination and renames it into place, so
an interrupted export never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax

from .errors import ArtifactError

FORMAT = "tvmq-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"

# The C++ compiler that links a shared library for each CPU architecture.
_LINKERS = {"x86_64": "g++", "aarch64": "aarch64-linux-gnu-g++"}
_LINKER_PACKAGES = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}


@dataclass
class Artifact:
    """A compiled model: the VM executable and its manifest."""

    executable: relax.VMExecutable
    manifest: dict[str, Any] = field(default_factory=dict)

    def device_sources(self) -> dict[str, str]:
        """The generated device code (e.g. CUDA C) by module kind; empty for CPU targets."""
        sources = {}
        pending = list(self.executable.mod.imports)
        while pending:
            module = pending.pop()
            pending.extend(module.imports)
            if module.kind not in ("llvm", "c", "static_library"):
                sources[module.kind] = module.inspect_source(module.kind)
        return sources

    def export(self, path: str | os.PathLike) -> str:
        """Write the artifact to ``path`` (a ``.tar``) and return the path."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ArtifactError(f"output directory '{directory}' does not exist; create it first")
        with tempfile.TemporaryDirectory(prefix="tvmq-export-") as work:
            library = os.path.join(work, LIBRARY)
            self.executable.export_library(library, fcompile=_linker(self.manifest["arch"]))
            fd, partial = tempfile.mkstemp(prefix=".tvmq-", suffix=".tar.partial", dir=directory)
            try:
                with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
                    _add_bytes(tar, MANIFEST, json.dumps(self.manifest, indent=2).encode())
                    tar.add(library, arcname=LIBRARY, recursive=False)
                os.replace(partial, path)
            except BaseException:
                if os.path.exists(partial):
                    os.unlink(partial)
                raise
        return path


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _linker(arch: str):
    compiler = _LINKERS.get(arch)
    if compiler is None:
        raise ArtifactError(f"tvmq cannot link libraries for CPU architecture '{arch}'")
    if shutil.which(compiler) is None:
        package = _LINKER_PACKAGES.get(compiler, compiler)
        raise ArtifactError(
            f"linking an {arch} library needs '{compiler}', which is not installed; "
            f"install Debian's {package} (make setup-system does)"
        )
    from tvm.support import cc

    return cc.cross_compiler(compiler) if arch != "x86_64" else cc.create_shared


def read_manifest(tar: tarfile.TarFile, source: str) -> dict[str, Any]:
    """The manifest of an opened artifact tar, checked for format and version."""
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise ArtifactError(
            f"'{source}' is not a tvmq artifact (no {MANIFEST}); build one with tvmq compile"
        ) from None
    try:
        manifest = json.loads(tar.extractfile(member).read())
    except (ValueError, AttributeError):
        raise ArtifactError(f"'{source}' has an unreadable {MANIFEST}; rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"'{source}' is not a tvmq artifact (its manifest is not {FORMAT}); "
            "build one with tvmq compile"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"'{source}' has artifact format {version!r}, newer than this tvmq reads "
            f"({FORMAT_VERSION}); upgrade tvmq or rebuild the artifact"
        )
    if manifest.get("tvm_version") != tvm.__version__:
        raise ArtifactError(
            f"'{source}' was built with TVM {manifest.get('tvm_version')} but this is TVM "
            f"{tvm.__version__}; rebuild it with this tvmq"
        )
    return manifest


def check_members(tar: tarfile.TarFile, source: str) -> None:
    """Refuse any member that could write outside the extraction folder."""
    for member in tar.getmembers():
        name = member.name
        unsafe = (
            os.path.isabs(name)
            or ".." in name.replace("\\", "/").split("/")
            or not member.isfile()
        )
        if unsafe:
            raise ArtifactError(
                f"'{source}' holds an unsafe member '{name}' (absolute path, '..' or a "
                "link); refusing to unpack it — use an artifact from tvmq compile"
            )
