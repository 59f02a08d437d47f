"""Generate the Python code of the promptpipe.v1 wire contract.

    python protos/generate.py            # writes services/promptpipe/v1/
    python protos/generate.py --out DIR  # writes DIR/promptpipe/v1/ (the drift test)

The output is committed and never edited by hand; tests/test_protos.py fails when
it differs from what this script produces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "services"
HEADER = '"""Generated from protos/promptpipe/v1 by protos/generate.py. Do not edit."""\n'


def generate(out: Path) -> list[Path]:
    package = out / "promptpipe" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    for stale in package.glob("*_pb2*.py*"):
        stale.unlink()
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "promptpipe" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (package / "__init__.py").write_text(HEADER)
    return sorted(package.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
