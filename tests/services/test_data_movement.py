"""The data movement service, served for real on 127.0.0.1:0 with the envelope
interceptors over stores in a temporary directory; every envelope validated."""

from __future__ import annotations

import gc
import hashlib
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import pytest

import envelope_grpc
import services.data_movement
from envelope_grpc import EnvelopeConfig, Limit, LimitsPolicy
from envelope_grpc.v1.envelope_pb2 import (
    DataClassification,
    DecisionOutcome,
    EnvelopeFlag,
    ExecutionEnvelope,
    ExecutionKind,
    GrantStage,
    LifecycleState,
    ResourceDimension,
    Resources,
)
from services.data_movement import Stores, _service
from services.data_movement.v1 import data_movement_pb2 as pb
from services.data_movement.v1 import data_movement_pb2_grpc as pb_grpc
from tests.conftest import COMPLETED_PATH, error_info, only_grant, refused, transitions
from tests.services import conftest
from tests.services._python_m import python_m, stop_with_sigterm

S = LifecycleState
BACKEND = GrantStage.GRANT_STAGE_BACKEND
PUBLIC = DataClassification.DATA_CLASSIFICATION_PUBLIC
INTERNAL = DataClassification.DATA_CLASSIFICATION_INTERNAL
CONFIDENTIAL = DataClassification.DATA_CLASSIFICATION_CONFIDENTIAL
RESTRICTED = DataClassification.DATA_CLASSIFICATION_RESTRICTED
DATA = np.random.default_rng(7).bytes(200_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()


class Served(conftest.Served):
    """A running data movement service over stores under ``root``."""

    def __init__(self, root: pathlib.Path, config: EnvelopeConfig | None = None) -> None:
        self.root = root
        super().__init__(services.data_movement.services(root), config)
        self.stub = pb_grpc.DataMovementServiceStub(self.channel)

    def envelope(self) -> ExecutionEnvelope:
        return self.envelopes(1)[0]

    def upload(self, header: pb.UploadHeader, chunks: Sequence[bytes]) -> pb.UploadResponse:
        messages = [pb.UploadRequest(header=header), *(pb.UploadRequest(chunk=c) for c in chunks)]
        return self.stub.Upload(iter(messages), timeout=30)

    def object(self, store: str, path: str) -> pathlib.Path:
        return self.root / store / path

    def staging(self) -> list[pathlib.Path]:
        return list((self.root / ".staging").iterdir())


@pytest.fixture
def served(servers: conftest.Servers, tmp_path: pathlib.Path) -> Served:
    return servers(Served, tmp_path / "stores")


def header(**fields: Any) -> pb.UploadHeader:
    base: dict[str, Any] = {
        "source": "laptop:/tmp/model.bin",
        "store": "lake-eu",
        "path": "runs/2026/model.bin",
        "size_bytes": len(DATA),
        "data_classification": CONFIDENTIAL,
        "region": "eu-west-1",
        "sha256": DATA_SHA,
        "tenant": "acme",
    }
    return pb.UploadHeader(**(base | fields))


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def assert_rejected(
    served: Served, error: grpc.RpcError, code: grpc.StatusCode, reason: str
) -> ExecutionEnvelope:
    assert error.code() == code
    info = error_info(error)
    assert info.reason == reason
    env = served.envelopes(1)[-1]
    assert info.metadata["envelope_id"] == env.envelope_id
    assert env.lifecycle.state == S.LIFECYCLE_STATE_REJECTED
    assert env.outcome.reason_code == reason
    assert env.outcome.status_code == code.value[0]
    assert not [g for g in env.grants if g.stage == GrantStage.GRANT_STAGE_BACKEND]
    assert not env.HasField("binding")
    return env


def put(served: Served, store: str, path: str, data: bytes) -> None:
    file = served.object(store, path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)


# -- upload ----------------------------------------------------------------------------------------


def test_upload_in_chunks_is_stored_verified_and_accounted(served: Served) -> None:
    chunks = chunked(DATA, 48_000)
    assert len(chunks) == 5
    reply = served.upload(header(), chunks)

    assert reply == pb.UploadResponse(
        store="lake-eu", path="runs/2026/model.bin", size_bytes=len(DATA), sha256=DATA_SHA, chunks=5
    )
    stored = served.object("lake-eu", "runs/2026/model.bin").read_bytes()
    assert stored == DATA
    assert hashlib.sha256(stored).hexdigest() == DATA_SHA
    assert served.staging() == []

    env = served.envelope()
    assert env.execution.kind == ExecutionKind.EXECUTION_KIND_DATA_MOVEMENT
    assert env.execution.method == "/services.data_movement.v1.DataMovementService/Upload"
    target = env.execution.target
    assert (target.type, target.name) == ("store", "lake-eu")
    assert dict(target.attributes) == {"path": "runs/2026/model.bin", "source": "laptop:/tmp/model.bin"}
    assert env.scope.data_classification == CONFIDENTIAL
    assert env.scope.region == "eu-west-1"
    assert env.principal.tenant == "acme"
    assert env.requested == Resources(bytes=len(DATA))
    grant = only_grant(env, BACKEND)
    assert grant.resources == Resources(bytes=len(DATA))
    assert grant.outcome == DecisionOutcome.DECISION_OUTCOME_ADMITTED
    binding = env.binding
    assert binding.node == "lake-eu"
    assert binding.endpoint == str((served.root / "lake-eu").resolve())
    assert binding.region == "eu-west-1"
    assert dict(binding.attributes) == {"path": "runs/2026/model.bin", "source": "laptop:/tmp/model.bin"}
    usage = env.outcome.usage
    assert usage.bytes_moved == len(DATA)
    assert usage.request_messages == 1 + len(chunks)
    assert usage.response_messages == 1
    assert transitions(env) == COMPLETED_PATH


def test_empty_upload(served: Served) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    reply = served.upload(header(path="empty", size_bytes=0, sha256=empty), [])
    assert (reply.size_bytes, reply.chunks) == (0, 0)
    assert served.object("lake-eu", "empty").read_bytes() == b""
    env = served.envelope()
    assert env.requested == Resources(bytes=0)
    assert env.outcome.usage.bytes_moved == 0
    assert env.outcome.usage.request_messages == 1


def test_checksum_mismatch_keeps_nothing(served: Served) -> None:
    wrong = hashlib.sha256(DATA + b"!").hexdigest()
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(sha256=wrong), chunked(DATA, 64_000))
    env = assert_rejected(served, caught.value, grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert not served.object("lake-eu", "runs/2026/model.bin").exists()
    assert not served.object("lake-eu", "runs").exists()
    assert served.staging() == []
    assert env.requested.bytes == len(DATA)
    assert env.outcome.usage.bytes_moved == len(DATA)  # the bytes travelled, then were refused


@pytest.mark.parametrize(
    ("declared", "moved"), [(len(DATA) + 1, len(DATA)), (len(DATA) - 1, len(DATA)), (100_000, 128_000)]
)
def test_size_other_than_declared_keeps_nothing(served: Served, declared: int, moved: int) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(size_bytes=declared), chunked(DATA, 64_000))
    env = assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH")
    assert env.outcome.usage.bytes_moved == moved  # a longer stream is cut at the chunk that overruns
    assert not served.object("lake-eu", "runs/2026/model.bin").exists()
    assert served.staging() == []


def test_upload_must_start_with_its_header(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Upload(iter([pb.UploadRequest(chunk=b"data")]), timeout=30)
    env = assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED")
    assert env.execution.target.name == ""


def test_second_header_is_refused(served: Served) -> None:
    messages = [
        pb.UploadRequest(header=header()),
        pb.UploadRequest(chunk=DATA[:10]),
        pb.UploadRequest(header=header()),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Upload(iter(messages), timeout=30)
    assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "UNEXPECTED_MESSAGE")
    assert served.staging() == []


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"store": "lake-mars"}, grpc.StatusCode.NOT_FOUND, "STORE_NOT_FOUND"),
        ({"sha256": ""}, grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_REQUIRED"),
        ({"sha256": "xyz"}, grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_REQUIRED"),
        (
            {"data_classification": RESTRICTED, "store": "lake-us", "region": ""},
            grpc.StatusCode.PERMISSION_DENIED,
            "CLASSIFICATION_NOT_ALLOWED",
        ),
        ({"region": "us-east-1"}, grpc.StatusCode.FAILED_PRECONDITION, "REGION_MISMATCH"),
        ({"path": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PATH"),
        ({"path": "a//b"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PATH"),
        ({"path": "a/" + "é" * 128}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PATH"),  # 256 bytes
    ],
)
def test_upload_refused_before_any_data(
    served: Served, fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(**fields), [DATA])
    env = assert_rejected(served, caught.value, code, reason)
    assert not env.outcome.usage.HasField("bytes_moved")
    assert served.staging() == []


def test_overlong_path_is_refused(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(path="x" * 513), [DATA])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_PATH"
    (env,) = served.collector.wait(1)
    assert env.outcome.reason_code == "INVALID_PATH"
    assert served.staging() == []
    assert env.execution.target.attributes["path"] == "x" * 512  # cut to the contract's limit
    assert envelope_grpc.validate(env) == []


def test_upload_without_declared_size_is_refused(served: Served) -> None:
    missing = header()
    missing.ClearField("size_bytes")
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(missing, [DATA])
    env = assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "SIZE_REQUIRED")
    assert not env.requested.HasField("bytes")


def test_declared_size_beyond_int64_is_refused_at_admission(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(size_bytes=2**64 - 1), chunked(DATA, 100_000))
    env = assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "EXTRACTION_FAILED")
    assert EnvelopeFlag.ENVELOPE_FLAG_EXTRACTION_FAILED in env.flags
    assert env.decision.deciding_policy == "extractor"
    assert not env.HasField("requested")
    assert envelope_grpc.validate(env) == []


def test_upload_above_the_admitted_bytes_is_refused(
    servers: conftest.Servers, tmp_path: pathlib.Path
) -> None:
    limits = LimitsPolicy([Limit(ResourceDimension.RESOURCE_DIMENSION_BYTES, 1000)])
    served = servers(Served, tmp_path, EnvelopeConfig(policies=[limits]))
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(header(), [DATA])
    env = assert_rejected(served, caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "BYTES_NOT_GRANTED")
    assert env.grants[0].resources.bytes == 1000


# -- path traversal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../escape.bin", "/tmp/escape.bin", "a/../../escape.bin", "..", "../lake-us/x"]
)
def test_path_traversal_is_refused_everywhere(served: Served, path: str) -> None:
    put(served, "lake-eu", "inside.bin", b"inside")
    calls: list[Callable[[], Any]] = [
        lambda: served.upload(
            header(path=path, size_bytes=4, sha256=hashlib.sha256(b"evil").hexdigest()), [b"evil"]
        ),
        lambda: list(served.stub.Download(pb.DownloadRequest(store="lake-eu", path=path), timeout=30)),
        lambda: served.stub.Copy(
            pb.CopyRequest(
                source_store="lake-eu", source_path=path, destination_store="scratch", destination_path="x"
            ),
            timeout=30,
        ),
        lambda: served.stub.Copy(
            pb.CopyRequest(
                source_store="lake-eu",
                source_path="inside.bin",
                destination_store="scratch",
                destination_path=path,
            ),
            timeout=30,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "PATH_TRAVERSAL"
    envelopes = served.envelopes(len(calls))
    assert {env.outcome.reason_code for env in envelopes} == {"PATH_TRAVERSAL"}
    assert not (served.root / "escape.bin").exists()
    assert not (served.root.parent / "escape.bin").exists()
    assert sorted(p.name for p in served.root.iterdir()) == [".staging", "lake-eu", "lake-us", "scratch"]
    assert [p.name for p in (served.root / "scratch").iterdir()] == []


def test_symbolic_link_out_of_a_store_is_refused(served: Served, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (served.root / "lake-eu" / "link").symlink_to(outside)
    data = b"payload"
    with pytest.raises(grpc.RpcError) as caught:
        served.upload(
            header(path="link/x.bin", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), [data]
        )
    assert_rejected(served, caught.value, grpc.StatusCode.INVALID_ARGUMENT, "PATH_TRAVERSAL")
    assert list(outside.iterdir()) == []


# -- download ---------------------------------------------------------------------------------------


def test_download_streams_the_object_back_exactly(served: Served) -> None:
    served.upload(header(), chunked(DATA, 100_000))
    responses = list(
        served.stub.Download(
            pb.DownloadRequest(
                store="lake-eu",
                path="runs/2026/model.bin",
                size_bytes=len(DATA),
                chunk_size_bytes=16_384,
                region="eu-west-1",
                data_classification=CONFIDENTIAL,
                tenant="acme",
            ),
            timeout=30,
        )
    )
    first, *rest = responses
    assert first.WhichOneof("kind") == "header"
    assert first.header == pb.DownloadHeader(size_bytes=len(DATA), sha256=DATA_SHA)
    assert {r.WhichOneof("kind") for r in rest} == {"chunk"}
    assert len(rest) == math.ceil(len(DATA) / 16_384)
    assert max(len(r.chunk) for r in rest) == 16_384
    assert b"".join(r.chunk for r in rest) == DATA

    _, env = served.envelopes(2)
    assert env.execution.method == "/services.data_movement.v1.DataMovementService/Download"
    assert (env.execution.target.name, dict(env.execution.target.attributes)) == (
        "lake-eu",
        {"path": "runs/2026/model.bin"},
    )
    assert env.requested == Resources(bytes=len(DATA))
    grant = only_grant(env, BACKEND)
    assert grant.resources == Resources(bytes=len(DATA))
    assert grant.outcome == DecisionOutcome.DECISION_OUTCOME_ADMITTED
    assert (env.binding.node, env.binding.region) == ("lake-eu", "eu-west-1")
    assert env.outcome.usage.bytes_moved == len(DATA)
    assert env.outcome.usage.response_messages == len(responses)
    assert transitions(env) == COMPLETED_PATH


def test_download_without_declared_size_widens_the_grant(served: Served) -> None:
    put(
        served, "scratch", "notes.txt", b"hello world"
    )  # written by no upload: as classified as scratch allows
    request = pb.DownloadRequest(store="scratch", path="notes.txt", data_classification=INTERNAL)
    responses = list(served.stub.Download(request, timeout=30))
    assert [r.WhichOneof("kind") for r in responses] == ["header", "chunk"]
    assert responses[1].chunk == b"hello world"
    env = served.envelope()
    assert not env.requested.HasField("bytes")
    grant = only_grant(env, BACKEND)
    assert grant.resources == Resources(bytes=11)
    assert (grant.outcome, grant.reason_code) == (DecisionOutcome.DECISION_OUTCOME_WIDENED, "OBJECT_SIZE")
    assert env.outcome.usage.bytes_moved == 11


@pytest.mark.parametrize(
    ("request_fields", "code", "reason"),
    [
        ({"path": "missing.bin"}, grpc.StatusCode.NOT_FOUND, "OBJECT_NOT_FOUND"),
        ({"path": "dir"}, grpc.StatusCode.NOT_FOUND, "OBJECT_NOT_FOUND"),
        ({"path": "dir/a.bin", "size_bytes": 3}, grpc.StatusCode.FAILED_PRECONDITION, "SIZE_MISMATCH"),
        (
            {"path": "dir/a.bin", "region": "us-east-1"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_MISMATCH",
        ),
        (
            {"path": "dir/a.bin", "chunk_size_bytes": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_CHUNK_SIZE",
        ),
    ],
)
def test_download_refusals(
    served: Served, request_fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    put(served, "lake-eu", "dir/a.bin", b"abcd")
    request = pb.DownloadRequest(store="lake-eu", data_classification=RESTRICTED, **request_fields)
    with pytest.raises(grpc.RpcError) as caught:
        list(served.stub.Download(request, timeout=30))
    assert_rejected(served, caught.value, code, reason)


# -- copy ------------------------------------------------------------------------------------------------


def test_copy_between_stores_records_bytes_moved_and_binding(served: Served) -> None:
    served.upload(header(path="features/part-0.parquet"), [DATA])  # confidential
    reply = served.stub.Copy(
        pb.CopyRequest(
            source_store="lake-eu",
            source_path="features/part-0.parquet",
            destination_store="lake-us",
            destination_path="mirror/part-0.parquet",
            size_bytes=len(DATA),
            data_classification=CONFIDENTIAL,
            region="us-east-1",
            tenant="acme",
        ),
        timeout=30,
    )
    assert reply == pb.CopyResponse(size_bytes=len(DATA), sha256=DATA_SHA)
    assert served.object("lake-us", "mirror/part-0.parquet").read_bytes() == DATA
    assert served.object("lake-eu", "features/part-0.parquet").read_bytes() == DATA
    assert served.staging() == []

    env = served.envelopes(2)[1]
    assert env.execution.method == "/services.data_movement.v1.DataMovementService/Copy"
    target = env.execution.target
    assert (target.type, target.name) == ("store", "lake-us")
    assert dict(target.attributes) == {
        "path": "mirror/part-0.parquet",
        "source_store": "lake-eu",
        "source_path": "features/part-0.parquet",
    }
    assert (env.scope.region, env.scope.data_classification) == ("us-east-1", CONFIDENTIAL)
    assert env.requested == Resources(bytes=len(DATA))
    assert only_grant(env, BACKEND).outcome == DecisionOutcome.DECISION_OUTCOME_ADMITTED
    binding = env.binding
    assert (binding.node, binding.endpoint, binding.region) == (
        "lake-us",
        str((served.root / "lake-us").resolve()),
        "us-east-1",
    )
    assert dict(binding.attributes) == {
        "path": "mirror/part-0.parquet",
        "source_store": "lake-eu",
        "source_path": "features/part-0.parquet",
        "source_region": "eu-west-1",
    }
    assert env.outcome.usage.bytes_moved == len(DATA)
    assert transitions(env) == COMPLETED_PATH


@pytest.mark.parametrize(
    ("request_fields", "code", "reason"),
    [
        ({"source_path": "missing"}, grpc.StatusCode.NOT_FOUND, "OBJECT_NOT_FOUND"),
        ({"source_store": "nowhere"}, grpc.StatusCode.NOT_FOUND, "STORE_NOT_FOUND"),
        (
            {"data_classification": RESTRICTED},
            grpc.StatusCode.PERMISSION_DENIED,
            "CLASSIFICATION_NOT_ALLOWED",
        ),
        ({"region": "eu-west-1"}, grpc.StatusCode.FAILED_PRECONDITION, "REGION_MISMATCH"),
        ({"size_bytes": 1}, grpc.StatusCode.FAILED_PRECONDITION, "SIZE_MISMATCH"),
        ({"destination_path": "a.bin/b"}, grpc.StatusCode.FAILED_PRECONDITION, "PATH_CONFLICT"),
    ],
)
def test_copy_refusals(
    served: Served, request_fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    put(served, "scratch", "a.bin", b"abcd")
    put(served, "lake-us", "a.bin", b"old")
    fields = {
        "source_store": "scratch",
        "source_path": "a.bin",
        "destination_store": "lake-us",
        "destination_path": "copy.bin",
        "data_classification": INTERNAL,
    } | request_fields
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Copy(pb.CopyRequest(**fields), timeout=30)
    assert_rejected(served, caught.value, code, reason)
    assert not served.object("lake-us", "copy.bin").exists()
    assert served.object("lake-us", "a.bin").read_bytes() == b"old"


def test_an_object_is_read_and_copied_only_as_classified_as_it_was_written(served: Served) -> None:
    served.upload(header(data_classification=RESTRICTED), [DATA])
    path = {"store": "lake-eu", "path": "runs/2026/model.bin"}
    copy = {"source_store": "lake-eu", "source_path": path["path"], "destination_store": "scratch"}
    refusals = [
        refused(lambda: list(served.stub.Download(pb.DownloadRequest(**path), timeout=30))),
        refused(lambda: served.stub.Copy(pb.CopyRequest(**copy, destination_path="c.bin"), timeout=30)),
        refused(
            lambda: served.stub.Copy(
                pb.CopyRequest(**copy, destination_path="c.bin", data_classification=RESTRICTED), timeout=30
            )
        ),
    ]
    assert [(e.code(), error_info(e).reason) for e in refusals] == [
        (grpc.StatusCode.PERMISSION_DENIED, "CLASSIFICATION_UNDECLARED"),
        (grpc.StatusCode.PERMISSION_DENIED, "CLASSIFICATION_UNDECLARED"),
        (grpc.StatusCode.PERMISSION_DENIED, "CLASSIFICATION_NOT_ALLOWED"),
    ]
    assert refusals[0].details() == (
        "'runs/2026/model.bin' in 'lake-eu' is DATA_CLASSIFICATION_RESTRICTED: "
        "declare its classification to read it"
    )
    declared = pb.DownloadRequest(**path, data_classification=RESTRICTED)
    responses = list(served.stub.Download(declared, timeout=30))
    assert b"".join(r.chunk for r in responses[1:]) == DATA
    envelopes = served.envelopes(5)
    assert [env.scope.data_classification for env in envelopes] == [RESTRICTED, 0, 0, RESTRICTED, RESTRICTED]
    assert not served.object("scratch", "c.bin").exists()


def test_while_an_object_is_replaced_its_path_counts_as_the_higher_classification(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[Any] = []
    classify, publish = Stores.classify, _service._publish
    monkeypatch.setattr(
        Stores,
        "classify",
        lambda self, store, path, level: (log.append(level), classify(self, store, path, level)),
    )
    monkeypatch.setattr(_service, "_publish", lambda *args: (log.append("moved"), publish(*args))[1])
    served.upload(header(store="scratch", region="local", data_classification=PUBLIC), [DATA])
    served.upload(header(store="scratch", region="local", data_classification=INTERNAL), [DATA])
    served.upload(header(store="scratch", region="local", data_classification=PUBLIC), [DATA])
    assert log == [
        *(INTERNAL, "moved", PUBLIC),  # new: the store's ceiling until it is in place
        *(INTERNAL, "moved", INTERNAL),  # raised before the move
        *(INTERNAL, "moved", PUBLIC),  # lowered after it
    ]


# -- the service's own set-up ------------------------------------------------------------------


def test_default_root_is_a_temporary_directory_removed_with_its_stores() -> None:
    stores = Stores()
    root = stores.root
    assert sorted(p.name for p in root.iterdir()) == [".staging", "lake-eu", "lake-us", "scratch"]
    del stores
    gc.collect()
    assert not root.exists()


def test_python_m_serves_stores_under_root(tmp_path: pathlib.Path) -> None:
    with python_m("data_movement", "--root", str(tmp_path)) as (process, address):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DataMovementServiceStub(channel)
            data = b"over the command line"
            messages = [
                pb.UploadRequest(
                    header=pb.UploadHeader(
                        store="scratch",
                        path="x.txt",
                        size_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                ),
                pb.UploadRequest(chunk=data),
            ]
            assert stub.Upload(iter(messages), timeout=30).size_bytes == len(data)
        assert (tmp_path / "scratch" / "x.txt").read_bytes() == data
        assert stop_with_sigterm(process) == 0
