"""Named stores: directories on local disk under one root.

``ROOT/<store>/`` holds a store's objects; ``ROOT/.staging/`` holds uploads
and copies until they are verified and renamed into place (same file system,
so the rename is atomic and a failed transfer leaves nothing behind).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from typing import Final

from envelope_grpc.v1.envelope_pb2 import DataClassification

_STORE_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: Longest object path accepted (the envelope keeps it as a target attribute
#: of at most 512 characters).
MAX_PATH: Final = 512
#: The longest file name a file system takes.
MAX_PART_BYTES: Final = 255


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a store is: its region and the highest classification it may hold."""

    region: str
    max_classification: DataClassification.ValueType


#: The stores a service has unless told otherwise.
DEFAULT_STORES: Final[Mapping[str, StoreSpec]] = {
    "lake-eu": StoreSpec("eu-west-1", DataClassification.DATA_CLASSIFICATION_RESTRICTED),
    "lake-us": StoreSpec("us-east-1", DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL),
    "scratch": StoreSpec("local", DataClassification.DATA_CLASSIFICATION_INTERNAL),
}


@dataclasses.dataclass(frozen=True)
class Store:
    """One store: its name, region, classification ceiling and directory."""

    name: str
    region: str
    max_classification: DataClassification.ValueType
    root: pathlib.Path


class PathError(ValueError):
    """An object path that is malformed or leaves its store."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


class Stores:
    """The stores under ``root`` (default: a fresh temporary directory,
    removed when this object is collected or the process exits)."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, specs: Mapping[str, StoreSpec] | None = None
    ) -> None:
        if root is None:
            made = tempfile.mkdtemp(prefix="envelope-data-movement-")
            weakref.finalize(self, shutil.rmtree, made, ignore_errors=True)
            root = made
        self.root = pathlib.Path(root).resolve()
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._stores: dict[str, Store] = {}
        # The classification each object was written with, by (store, path).
        self._classifications: dict[tuple[str, str], DataClassification.ValueType] = {}
        self._lock = threading.Lock()
        for name, spec in (specs if specs is not None else DEFAULT_STORES).items():
            if not _STORE_NAME.match(name):
                raise ValueError(f"not a store name: {name!r}")
            directory = self.root / name
            directory.mkdir(exist_ok=True)
            self._stores[name] = Store(name, spec.region, spec.max_classification, directory)

    def get(self, name: str) -> Store | None:
        """The store called ``name``."""
        return self._stores.get(name)

    def names(self) -> list[str]:
        """Every store's name."""
        return list(self._stores)

    def classification(self, store: Store, path: str) -> DataClassification.ValueType:
        """The classification the object at ``path`` (normalized) was written
        with; for one this process did not write, the most it may be: the
        store's ceiling."""
        with self._lock:
            return self._classifications.get((store.name, path), store.max_classification)

    def classify(self, store: Store, path: str, classification: DataClassification.ValueType) -> None:
        """Record the classification the object at ``path`` was written with."""
        with self._lock:
            self._classifications[(store.name, path)] = classification

    def resolve(self, store: Store, path: str) -> tuple[str, pathlib.Path]:
        """The normalized relative path and the file of ``path`` in ``store``.

        Raises PathError for an empty, overlong or malformed path, or one with
        a part longer than a file name may be (INVALID_PATH), and for one that
        would leave the store (PATH_TRAVERSAL): absolute paths, ".." parts,
        and symbolic links pointing outside.
        """
        if not path or len(path) > MAX_PATH:
            raise PathError("INVALID_PATH", f"a path has 1 to {MAX_PATH} characters")
        if "\x00" in path or "\\" in path:
            raise PathError("INVALID_PATH", "a path holds no NUL or backslash")
        if path.startswith("/"):
            raise PathError("PATH_TRAVERSAL", "a path is relative to its store")
        parts = path.split("/")
        if ".." in parts:
            raise PathError("PATH_TRAVERSAL", "a path has no '..' parts")
        if any(part in ("", ".") for part in parts):
            raise PathError("INVALID_PATH", "a path has no empty or '.' parts")
        if any(len(part.encode()) > MAX_PART_BYTES for part in parts):
            raise PathError("INVALID_PATH", f"a path's parts have at most {MAX_PART_BYTES} bytes")
        file = store.root.joinpath(*parts)
        if not file.resolve().is_relative_to(store.root):
            raise PathError("PATH_TRAVERSAL", "the path leaves its store")
        return "/".join(parts), file

    def staged(self) -> tuple[int, pathlib.Path]:
        """A new staging file, open for writing: its descriptor and path."""
        fd, name = tempfile.mkstemp(dir=self.staging, suffix=".part")
        return fd, pathlib.Path(name)


def conflict(store: Store, file: pathlib.Path) -> str:
    """Why ``file`` cannot be written (a directory is in the way, or a file
    where a directory is needed); empty when it can."""
    if file.is_dir():
        return "the path names a directory"
    parent = file.parent
    while parent != store.root:
        if parent.exists() and not parent.is_dir():
            return f"{parent.relative_to(store.root)} is a file, not a directory"
        parent = parent.parent
    return ""
