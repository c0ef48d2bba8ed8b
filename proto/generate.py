"""Regenerate the Python gRPC code from ``proto/*.proto``.

Usage: ``python -m expertplane.proto.generate [--check]``. ``--check`` regenerates into a
temporary directory and exits 1 if the committed files differ (CI runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import pathlib
import shutil
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent


def _generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every .proto file; returns the generated files under ``out_dir``."""
    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-Iexpertplane/proto={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + [f"expertplane/proto/{p.name}" for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "expertplane" / "proto").glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(pathlib.Path(tmp))
        stale = [g.name for g in generated if not (PROTO_DIR / g.name).exists()
                 or not filecmp.cmp(g, PROTO_DIR / g.name, shallow=False)]
        if args.check:
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run python -m expertplane.proto.generate",
                      file=sys.stderr)
                return 1
            return 0
        for g in generated:
            shutil.copyfile(g, PROTO_DIR / g.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
