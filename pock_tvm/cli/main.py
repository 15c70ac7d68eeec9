"""``pock-tvm``: parse arguments and call the matching ``pock_tvm.interface`` function."""

from __future__ import annotations

import argparse
import logging
import sys


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pock-tvm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into a training program directory")
    c.add_argument("model", help="file.onnx, a reference model (mobilenetv2, resnet18, mlp, smallcnn) or file.py:factory")
    c.add_argument("--scheme", default="full", help="preset (full, bias-only, last-N, tte-mbv2) or .toml/.json")
    c.add_argument("--target", default="host")
    c.add_argument("--input-shape", type=_shape, help="e.g. 8,3,128,128")
    c.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    c.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    c.add_argument("--lr", type=float)
    c.add_argument("--momentum", type=float, default=0.0)
    c.add_argument("--weight-decay", type=float, default=0.0)
    c.add_argument("-o", "--output", required=True)

    i = sub.add_parser("info", help="show what a program updates and what its step costs")
    i.add_argument("program")

    t = sub.add_parser("train", help="run training steps over an .npz data file")
    t.add_argument("program")
    t.add_argument("--data", required=True, help=".npz with 'x' (or one array per input) and 'y'")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float)
    t.add_argument("--no-save", action="store_true", help="do not write the updated state back")

    d = sub.add_parser("demo", help="compile and fine-tune MobileNetV2-w0.35@128 on the host")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--scheme", default="tte-mbv2")
    return parser


def _optimizer(args):
    from ..optim import SGD, Adam, AdamW

    if args.optimizer == "sgd":
        return SGD(lr=args.lr or 0.01, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return Adam(lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    return AdamW(lr=args.lr or 1e-3, weight_decay=args.weight_decay or 0.01)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "train" else logging.WARNING,
                        format="%(message)s")
    from .. import interface  # noqa: F401  (imports TVM; keep --help fast)
    from ..interface import commands, demo

    try:
        if args.command == "compile":
            program = commands.compile_to_dir(args.model, args.output, args.scheme, args.target,
                                              args.input_shape, args.loss, _optimizer(args))
            print(program.report())
            print(f"\nwrote {args.output}")
        elif args.command == "info":
            print(commands.info(args.program))
        elif args.command == "train":
            losses = commands.train(args.program, args.data, args.epochs, args.lr, not args.no_save)
            print(f"{len(losses)} steps, loss {losses[0]:.5f} -> {losses[-1]:.5f}")
        elif args.command == "demo":
            demo.demo(args.steps, args.batch, args.scheme)
    except ValueError as err:
        print(f"pock-tvm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
