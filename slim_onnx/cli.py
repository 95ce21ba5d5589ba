"""The `slim-onnx` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slim-onnx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small model, pack it into SlimMatMul, run and compare it")
    demo.add_argument("--size", type=int, default=1024, help="K = N of the demo layers (default 1024)")
    demo.add_argument("--layers", type=int, default=4, help="number of stacked layers (default 4)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from slim_onnx.demo import run_demo

        return run_demo(size=args.size, layers=args.layers)
    return 2


if __name__ == "__main__":
    sys.exit(main())
