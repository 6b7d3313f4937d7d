"""Regenerates the protobuf modules under recserve/v1 from protos/ (`python -m recserve.protos`).

The output path follows the proto package (recserve.v1), so the generated imports work without patching.
`--check` exits non-zero when the committed modules differ from what the .proto files generate.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) on every .proto under protos/ into out_dir; returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated modules are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            target = ROOT / rel
            if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                stale.append(rel)
                if not args.check:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(path.read_bytes())
    if args.check and stale:
        print("stale generated modules (run `make proto`): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print("up to date" if not stale else "regenerated: " + ", ".join(map(str, stale)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
