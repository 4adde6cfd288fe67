"""``sparse-rl`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="GRPO on SmolLM2-135M-Instruct training a 10%% subnetwork, on CPU")
    demo.add_argument("--density", type=float, default=0.1)
    demo.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the demo's preset)")
    demo.add_argument("--output-dir", default="outputs/demo")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(density=args.density, steps=args.steps, output_dir=args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
