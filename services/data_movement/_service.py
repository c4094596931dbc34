"""The data movement servicer: upload, download and copy between named stores.

Envelope steps, in order:

* Refusals happen before any backend grant, through ``envelope_grpc.reject``
  (state REJECTED, a reason code in the envelope, an ErrorInfo for the
  caller): unknown store or object (NOT_FOUND), malformed paths (INVALID_PATH)
  and paths leaving their store (PATH_TRAVERSAL, both INVALID_ARGUMENT), a
  classification above what the store may hold (PERMISSION_DENIED), a region
  other than the store's or a size other than the object's (FAILED_PRECONDITION),
  admission granting fewer bytes than the object needs (RESOURCE_EXHAUSTED).
* An upload is received into a staging file and verified before anything is
  granted: a stream longer or shorter than its declared size (SIZE_MISMATCH,
  INVALID_ARGUMENT) or data whose SHA-256 differs from the header's
  (CHECKSUM_MISMATCH, DATA_LOSS) is refused, the staging file removed, and no
  object is kept. The upload is REJECTED, not FAILED, because the backend
  refuses to accept the object; the bytes that did travel are still recorded
  as usage. Only a verified object is granted, bound and renamed into place.
* The backend's grant is admission's grant (or the request) with ``bytes`` set
  to the object's size: ADMITTED when the caller declared that size, WIDENED
  (OBJECT_SIZE) when it declared none.
* The binding: node = the store, endpoint = its directory, region = its
  region, attributes = the object path (and the source of a copy).
* Every object keeps the classification it was written with (one this
  process did not write counts as its store's ceiling). Reading or copying
  it needs a declared classification at least as high, so that admission
  decided on what the data really is (CLASSIFICATION_UNDECLARED,
  PERMISSION_DENIED); a copy is then held to the destination's ceiling.
* Usage: ``bytes_moved`` is the payload that travelled (received, sent, or
  copied); the library adds messages, bytes on the wire and duration.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
from collections.abc import Iterator
from typing import BinaryIO, Final

import grpc

import envelope_grpc
from envelope_grpc.v1.envelope_pb2 import Binding, DataClassification, LifecycleState, Usage
from services import _handler
from services._handler import refuse
from services.data_movement import _stores
from services.data_movement._stores import Store, Stores
from services.data_movement.v1 import data_movement_pb2 as pb
from services.data_movement.v1 import data_movement_pb2_grpc as pb_grpc

DEFAULT_CHUNK: Final = 64 * 1024
MAX_CHUNK: Final = 1024 * 1024
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
_LIVE: Final = frozenset(
    {
        LifecycleState.LIFECYCLE_STATE_ADMITTED,
        LifecycleState.LIFECYCLE_STATE_GRANTED,
        LifecycleState.LIFECYCLE_STATE_BOUND,
    }
)
_INVALID: Final = grpc.StatusCode.INVALID_ARGUMENT
_PRECONDITION: Final = grpc.StatusCode.FAILED_PRECONDITION


def record_moved(moved: int) -> None:
    """Record the payload bytes moved so far, while the envelope is live."""
    env = envelope_grpc.current_envelope()
    if env is not None and env.lifecycle.state in _LIVE:
        envelope_grpc.record_usage(Usage(bytes_moved=moved))


def grant_and_bind(size: int, binding: Binding) -> None:
    """Record the backend's grant (``size`` bytes) and the binding."""
    env = envelope_grpc.current_envelope()
    if env is None:
        return
    granted = _handler.starting_grant(env)
    granted.bytes = size
    reasons = []
    if not env.requested.HasField("bytes"):
        reasons.append(("OBJECT_SIZE", f"the object's size, {size} bytes; the request declared none"))
    _handler.record_backend_grant(env, granted, reasons)
    envelope_grpc.record_binding(binding)


def _admitted_bytes() -> int | None:
    """The bytes admission granted, when it granted a number."""
    admission = _handler.admission_grant(envelope_grpc.current_envelope())
    if admission is None or not admission.resources.HasField("bytes"):
        return None
    return int(admission.resources.bytes)


def _binding(store: Store, path: str, **attributes: str) -> Binding:
    return Binding(
        node=store.name,
        endpoint=str(store.root),
        region=store.region,
        runtime="localfs",
        attributes={"path": path, **attributes},
    )


def _publish(context: grpc.ServicerContext, staged: pathlib.Path, file: pathlib.Path, relative: str) -> bool:
    """Move a staged file into place, making its directory; True once it is
    there, FAILED_PRECONDITION when it cannot be."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, file)
    except OSError as error:
        _handler.abort(context, _PRECONDITION, f"cannot write {relative!r}: {error.strerror}")
    return True


def _discard(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class DataMovementServicer(pb_grpc.DataMovementServiceServicer):
    """Moves objects into, out of and between the stores."""

    def __init__(self, stores: Stores, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.stores = stores
        self.chunk_size = chunk_size

    # -- checks shared by the three methods ------------------------------------------------

    def _store(self, context: grpc.ServicerContext, name: str) -> Store:
        store = self.stores.get(name)
        if store is None:
            known = ", ".join(self.stores.names())
            refuse(
                context, "STORE_NOT_FOUND", f"no store {name!r} (stores: {known})", grpc.StatusCode.NOT_FOUND
            )
        return store

    def _path(self, context: grpc.ServicerContext, store: Store, path: str) -> tuple[str, pathlib.Path]:
        try:
            return self.stores.resolve(store, path)
        except _stores.PathError as error:
            refuse(context, error.reason_code, f"{error.message}: {path[:200]!r}", _INVALID)

    def _scope(
        self,
        context: grpc.ServicerContext,
        store: Store,
        classification: DataClassification.ValueType,
        region: str,
        *,
        writing: bool,
    ) -> None:
        if writing and classification > store.max_classification:
            refuse(
                context,
                "CLASSIFICATION_NOT_ALLOWED",
                f"store {store.name!r} holds data up to "
                f"{DataClassification.Name(store.max_classification)}, "
                f"not {DataClassification.Name(classification)}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        if region and region != store.region:
            refuse(
                context,
                "REGION_MISMATCH",
                f"store {store.name!r} is in {store.region!r}, not {region!r}",
                _PRECONDITION,
            )

    def _declared(
        self,
        context: grpc.ServicerContext,
        store: Store,
        path: str,
        classification: DataClassification.ValueType,
    ) -> None:
        held = self.stores.classification(store, path)
        if classification < held:
            refuse(
                context,
                "CLASSIFICATION_UNDECLARED",
                f"{path!r} in {store.name!r} is {DataClassification.Name(held)}: "
                f"declare its classification to read it",
                grpc.StatusCode.PERMISSION_DENIED,
            )

    def _move_in(
        self,
        context: grpc.ServicerContext,
        store: Store,
        staged: pathlib.Path,
        file: pathlib.Path,
        path: str,
        classification: DataClassification.ValueType,
    ) -> bool:
        """Move a staged object into place with its classification. While it
        moves, the path counts as the higher of the old and the new object's,
        so that neither can be read as less than it is."""
        before = self.stores.classification(store, path)
        self.stores.classify(store, path, max(before, classification))
        kept = _publish(context, staged, file, path)
        self.stores.classify(store, path, classification)
        return kept

    def _writable(self, context: grpc.ServicerContext, store: Store, file: pathlib.Path) -> None:
        reason = _stores.conflict(store, file)
        if reason:
            refuse(context, "PATH_CONFLICT", reason, _PRECONDITION)

    def _stored_size(
        self, context: grpc.ServicerContext, request: pb.DownloadRequest | pb.CopyRequest, size: int
    ) -> None:
        """Refuse a stored object whose size is not the declared one, or is
        more than admission granted."""
        if request.HasField("size_bytes") and request.size_bytes != size:
            refuse(
                context,
                "SIZE_MISMATCH",
                f"the object has {size} bytes, not {request.size_bytes}",
                _PRECONDITION,
            )
        self._within_grant(context, size)

    def _within_grant(self, context: grpc.ServicerContext, size: int) -> None:
        allowed = _admitted_bytes()
        if allowed is not None and size > allowed:
            refuse(
                context,
                "BYTES_NOT_GRANTED",
                f"the object has {size} bytes; admission granted {allowed}",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

    def _open(self, context: grpc.ServicerContext, store: Store, path: str) -> tuple[str, BinaryIO, int]:
        relative, file = self._path(context, store, path)
        try:
            source = file.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            refuse(
                context,
                "OBJECT_NOT_FOUND",
                f"no object {relative!r} in {store.name!r}",
                grpc.StatusCode.NOT_FOUND,
            )
        return relative, source, os.fstat(source.fileno()).st_size

    # -- upload ----------------------------------------------------------------------------------

    def Upload(
        self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext
    ) -> pb.UploadResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            refuse(context, "HEADER_REQUIRED", "an upload starts with its header", _INVALID)
        header = first.header
        store = self._store(context, header.store)
        relative, file = self._path(context, store, header.path)
        if not header.HasField("size_bytes"):
            refuse(context, "SIZE_REQUIRED", "an upload declares its size_bytes", _INVALID)
        expected = header.sha256.lower()
        if not _SHA256.match(expected):
            refuse(context, "CHECKSUM_REQUIRED", "an upload declares its SHA-256 (64 hex digits)", _INVALID)
        self._scope(context, store, header.data_classification, header.region, writing=True)
        self._writable(context, store, file)
        self._within_grant(context, header.size_bytes)
        declared = header.size_bytes
        fd, staged = self.stores.staged()
        received = chunks = 0
        kept = False
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for message in request_iterator:
                    if message.WhichOneof("kind") != "chunk":
                        refuse(
                            context,
                            "UNEXPECTED_MESSAGE",
                            "only chunks follow the header",
                            _INVALID,
                        )
                    data = message.chunk
                    received += len(data)
                    chunks += 1
                    record_moved(received)  # so far, whatever happens next
                    if received > declared:
                        refuse(
                            context,
                            "SIZE_MISMATCH",
                            f"more data than the declared {declared} bytes",
                            _INVALID,
                        )
                    digest.update(data)
                    out.write(data)
            if received != declared:
                refuse(
                    context,
                    "SIZE_MISMATCH",
                    f"received {received} bytes, declared {declared}",
                    _INVALID,
                )
            actual = digest.hexdigest()
            if actual != expected:
                refuse(
                    context,
                    "CHECKSUM_MISMATCH",
                    f"the data's SHA-256 is {actual}, the header declared {expected}",
                    grpc.StatusCode.DATA_LOSS,
                )
            grant_and_bind(received, _binding(store, relative, source=header.source[:512]))
            kept = self._move_in(context, store, staged, file, relative, header.data_classification)
        finally:
            if not kept:
                _discard(staged)
            record_moved(received)
        return pb.UploadResponse(
            store=store.name, path=relative, size_bytes=received, sha256=actual, chunks=chunks
        )

    # -- download --------------------------------------------------------------------------------

    def Download(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadResponse]:
        store = self._store(context, request.store)
        chunk_size = self.chunk_size
        if request.HasField("chunk_size_bytes"):
            if not 0 < request.chunk_size_bytes <= MAX_CHUNK:
                refuse(context, "INVALID_CHUNK_SIZE", f"chunk_size_bytes is 1 to {MAX_CHUNK}", _INVALID)
            chunk_size = request.chunk_size_bytes
        self._scope(context, store, request.data_classification, request.region, writing=False)
        relative, source, size = self._open(context, store, request.path)
        with source:
            self._declared(context, store, relative, request.data_classification)
            self._stored_size(context, request, size)
            digest = hashlib.sha256()
            for block in iter(lambda: source.read(MAX_CHUNK), b""):
                digest.update(block)
            source.seek(0)
            grant_and_bind(size, _binding(store, relative))
            yield pb.DownloadResponse(header=pb.DownloadHeader(size_bytes=size, sha256=digest.hexdigest()))
            sent = 0
            for chunk in iter(lambda: source.read(chunk_size), b""):
                yield pb.DownloadResponse(chunk=chunk)
                sent += len(chunk)
                record_moved(sent)

    # -- copy ----------------------------------------------------------------------------------------

    def Copy(self, request: pb.CopyRequest, context: grpc.ServicerContext) -> pb.CopyResponse:
        origin = self._store(context, request.source_store)
        destination = self._store(context, request.destination_store)
        target, file = self._path(context, destination, request.destination_path)
        self._scope(context, destination, request.data_classification, request.region, writing=True)
        self._writable(context, destination, file)
        relative, source, size = self._open(context, origin, request.source_path)
        with source:
            self._declared(context, origin, relative, request.data_classification)
            self._stored_size(context, request, size)
            grant_and_bind(
                size,
                _binding(
                    destination,
                    target,
                    source_store=origin.name,
                    source_path=relative,
                    source_region=origin.region,
                ),
            )
            fd, staged = self.stores.staged()
            copied = 0
            kept = False
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    for block in iter(lambda: source.read(MAX_CHUNK), b""):
                        digest.update(block)
                        out.write(block)
                        copied += len(block)
                kept = self._move_in(context, destination, staged, file, target, request.data_classification)
            finally:
                if not kept:
                    _discard(staged)
                record_moved(copied)
        return pb.CopyResponse(size_bytes=copied, sha256=digest.hexdigest())
