"""Regenerate the Python code of every .proto under proto/.

The buf.validate definitions come from the installed protovalidate package:
its serialized descriptor is written to a descriptor set that protoc reads,
so no third-party .proto source lives in this repository.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"


def buf_validate_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """buf/validate/validate.proto and its imports, from the installed protovalidate."""
    from protovalidate._gen.buf.validate import validate_pb

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(desc: object) -> None:
        for dep in desc.dependencies:  # type: ignore[attr-defined]
            add(dep)
        if desc.name in seen:  # type: ignore[attr-defined]
            return
        seen.add(desc.name)  # type: ignore[attr-defined]
        files.file.add().ParseFromString(desc.proto.to_binary())  # type: ignore[attr-defined]

    add(validate_pb.desc())
    return files


def protos() -> list[str]:
    return sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))


def has_service(path: str) -> bool:
    return any(line.lstrip().startswith("service ") for line in (PROTO / path).read_text().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT), help="output root (default: the repository)")
    parser.add_argument("--image", help="also write a descriptor set of the contract to this path")
    args = parser.parse_args()
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deps = pathlib.Path(tmp) / "deps.binpb"
        deps.write_bytes(buf_validate_descriptor_set().SerializeToString())
        bindir = pathlib.Path(sys.executable).parent
        plugins = [f"--plugin=protoc-gen-{p}={bindir / f'protoc-gen-{p}'}" for p in ("mypy", "mypy_grpc")]
        base = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *plugins,
            f"--descriptor_set_in={deps}",
            f"-I{PROTO}",
        ]
        files = protos()
        image = (
            [f"--descriptor_set_out={args.image}", "--include_imports", "--include_source_info"]
            if args.image
            else []
        )
        run = [*base, f"--python_out={args.out}", f"--mypy_out={args.out}", *image, *files]
        subprocess.run(run, check=True)
        services = [f for f in files if has_service(f)]
        if services:
            grpc = [f"--grpc_python_out={args.out}", f"--mypy_grpc_out={args.out}"]
            subprocess.run([*base, *grpc, *services], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
