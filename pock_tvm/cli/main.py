"""``pock-tvm``: parse arguments and call the matching library function (``cli/commands.py`` and the
library below it)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from ..loss import LOSSES
from ..models import MODEL_NAMES
from ..optim import OPTIMIZERS
from ..options import PipelineOptions
from ..scheme import PRESETS as SCHEME_PRESETS
from ..targets.presets import PRESETS as TARGET_PRESETS

_LOSSES = [name for name in LOSSES if name != "ce"]
_OPTIMIZERS = list(OPTIMIZERS)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers, got {text!r}") from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return shape


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"takes an integer >= {low}, got {value}")
        return value
    return parse


def _number(low: float, high: float = float("inf")):
    """An argparse type: a finite number in ``[low, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, got {text!r}") from None
        if not low <= value <= high or value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"takes a finite number >= {low:g}, got {text!r}")
        return value
    return parse


_LR = _number(0.0, 3.4028234663852886e38)  # the step takes it as float32


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pock-tvm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a PyTorch or ONNX model into a training step that fine-tunes it on a device\n"
                    "(sparse updates chosen for your data, built ahead of time with TVM).",
        epilog="typical use:\n"
               "  pock-tvm compile model.onnx --scheme bias-only --input-shape 8,3,128,128 -o bundle/\n"
               "  pock-tvm train bundle/ --data data.npz --epochs 3\n"
               "  pock-tvm search mobilenetv2 --data data.npz --budget 2MB -o scheme.toml\n"
               "  pock-tvm compile mobilenetv2 --scheme scheme.toml --target rpi4 -o board/\n"
               "'pock-tvm COMMAND --help' describes each command; README.md has the concepts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each phase; show the traceback of an "
                        "internal error")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into a training program directory")
    c.add_argument("model", help=f"file.onnx, a reference model ({', '.join(MODEL_NAMES)}) or file.py:factory")
    c.add_argument("--scheme", default="full", help=f"preset ({', '.join(SCHEME_PRESETS)}, last-N) or a "
                   ".toml/.json scheme file")
    c.add_argument("--target", default="host", help=f"preset ({', '.join(TARGET_PRESETS)}) or a target "
                   ".toml/.json; writes a bundle for that device")
    c.add_argument("--input-shape", type=_shape, help="e.g. 8,3,128,128")
    c.add_argument("--loss", default="cross_entropy", choices=_LOSSES)
    c.add_argument("--optimizer", default="sgd", choices=_OPTIMIZERS)
    c.add_argument("--lr", type=_LR)
    c.add_argument("--momentum", type=_number(0.0, 1.0), default=0.0)
    c.add_argument("--weight-decay", type=_number(0.0), default=0.0)
    c.add_argument("--opt", default="O3", choices=["O0", "O1", "O2", "O3"],
                   help="training-graph optimizations (O3: all; O0: none, for measuring)")
    c.add_argument("--disable", action="append", default=[], metavar="NAME",
                   help="switch one optimization off: " + ", ".join(f.name for f in fields(PipelineOptions)))
    c.add_argument("--tuning-db", metavar="DIR", help="tuned kernel schedules (`pock-tvm tune --db`)")
    c.add_argument("--verify", action="store_true", help="run every scheduled kernel once against its unscheduled "
                   "form; a kernel that computes other numbers is reported and falls back to the plain schedule")
    c.add_argument("--prefix-cache", action="store_true", help="also compile the frozen prefix as a function of "
                   "its own, so that `train --prefix-cache` runs it once per sample (sparse schemes, fixed data)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--force", action="store_true", help="replace OUTPUT even if it is not a pock_tvm bundle")

    i = sub.add_parser("info", help="show what a program updates and what its step costs")
    i.add_argument("program")

    e = sub.add_parser("export", help="write a fine-tuned bundle as ONNX: the source model with the trained "
                       "parameters (LoRA merged), checked against the bundle with ONNX Runtime")
    e.add_argument("bundle")
    e.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    e.add_argument("--model", help="the source model (.onnx, a reference model name or module.py:factory); "
                   "default: the one the bundle was compiled from (pock-tvm compile records it)")
    e.add_argument("--force", action="store_true", help="replace an existing output file")

    q = sub.add_parser("quantize", help="quantize a float ONNX model to QDQ int8 (the form pock-tvm trains with "
                       "integer kernels and QAS), calibrated on your samples")
    q.add_argument("model", help="a float .onnx model")
    q.add_argument("--calibration", required=True, help=".npz of input samples (keys: the model's input names)")
    q.add_argument("-o", "--output", required=True, help="the QDQ .onnx file to write")
    q.add_argument("--force", action="store_true", help="replace an existing output file")

    t = sub.add_parser("train", help="run training steps over an .npz data file")
    t.add_argument("program")
    t.add_argument("--data", required=True, help=".npz with 'x' (or one array per input) and 'y'")
    t.add_argument("--epochs", type=_at_least(1), default=1)
    t.add_argument("--lr", type=_LR)
    t.add_argument("--no-save", action="store_true", help="do not write the updated state back")
    t.add_argument("--prefix-cache", choices=["float32", "float16", "int8"], help="run the frozen prefix once per "
                   "sample and train from its activations stored in this type (a bundle compiled with "
                   "--prefix-cache; not for augmented data)")

    b = sub.add_parser("build-runner", help="build the C++ device runner (cross-builds for ARM targets)")
    b.add_argument("--target", default="host")
    b.add_argument("-o", "--output", help="directory for pock_runner and its libraries (default dist/runner-TARGET)")

    p = sub.add_parser("pack-data", help="write an .npz data file as the runner's batch file")
    p.add_argument("bundle")
    p.add_argument("data", help=".npz with 'x' (or one array per input) and 'y'")
    p.add_argument("-o", "--output", required=True)

    r = sub.add_parser("run", help="run and time training steps of a bundle on a device over TVM RPC")
    r.add_argument("bundle")
    r.add_argument("--data", required=True, help="batch file from pack-data")
    r.add_argument("--rpc", required=True, metavar="HOST:PORT", help="device running `pock_runner serve`")
    r.add_argument("--steps", type=_at_least(0), default=0, help="default (0): one per batch")
    r.add_argument("--lr", type=_LR)

    u = sub.add_parser("tune", help="autotune the slowest kernels of a model's training step (MetaSchedule)")
    u.add_argument("model", nargs="?", help="as for compile, or a bundle from `pock-tvm compile` (its model, "
                   "scheme, shapes, optimizer and target)")
    u.add_argument("--scheme", default="full")
    u.add_argument("--input-shape", type=_shape)
    u.add_argument("--loss", default="cross_entropy", choices=_LOSSES)
    u.add_argument("--db", metavar="DIR", help="tuning database directory, created or continued (default: the "
                   "one shipped for this CPU's vector ISA, pock_tvm/tuning/<arch>-<isa>)")
    u.add_argument("--kernels", type=_at_least(1), default=10, help="how many of the slowest kernels to tune")
    u.add_argument("--trials", type=_at_least(1), default=16, help="MetaSchedule trials per kernel (~4 s each here)")
    u.add_argument("--target", default="host", help="as for compile (CPU targets)")
    u.add_argument("--rpc", metavar="HOST:PORT", help="measure on this RPC server (a board running "
                   "`pock_runner serve --allow-remote-code` or `python -m tvm.exec.rpc_server`)")
    u.add_argument("--tracker", metavar="HOST:PORT", help="measure on a board of this RPC tracker (with --key)")
    u.add_argument("--key", help="tracker key of the boards, e.g. rpi4")
    u.add_argument("--timeout", type=_number(1.0), default=120.0, help="seconds one remote measurement may take")
    u.add_argument("--refresh-defaults", action="store_true", help="no model: measure the current default "
                   "schedule of every kernel in --db and keep it where it beats the database (after an upgrade)")

    f = sub.add_parser("profile", help="time each kernel of a bundle's training step on this machine")
    f.add_argument("bundle")
    f.add_argument("--steps", type=_at_least(1), default=5)
    f.add_argument("--top", type=_at_least(1), default=15)

    s = sub.add_parser("search", help="choose the sparse scheme: contribution analysis on your data, then the "
                       "updates with the most gain within a memory (and latency) budget")
    s.add_argument("model", help=f"a reference model ({', '.join(MODEL_NAMES)}), file.py:factory or "
                   "module:factory (pock_tvm.models.hf:smollm2_causal_lm)")
    s.add_argument("--data", required=True, help=".npz with 'x' (samples) and 'y' (labels), or token data: "
                   "'input_ids', 'attention_mask' and 'labels'; a quarter is held out to measure each option's gain")
    s.add_argument("--loss", choices=["cross_entropy", "next_token"], default="cross_entropy",
                   help="next_token: a causal LM, each option scored by the held-out next-token loss")
    s.add_argument("--metric", choices=["accuracy", "loss"], help="how a classifier's options are scored on the "
                   "held-out data (default accuracy; loss is continuous: better with few held-out samples)")
    s.add_argument("--lr", type=float, help="Adam learning rate of each option's fine-tune (default 1e-3)")
    s.add_argument("--batch", type=_at_least(1), help="token data: sequences per step (default 1)")
    s.add_argument("--samples", type=_at_least(1), help="fine-tune each option on at most this many samples")
    s.add_argument("--last-blocks", type=_at_least(1), help="a transformer: offer the options of its last N "
                   "blocks only (LoRA's always)")
    s.add_argument("--lora-ranks", help="a transformer: ranks of the LoRA options, e.g. 4,8 (default 4,8,16; "
                   "none: no LoRA options)")
    s.add_argument("--time-budget", help="stop the analysis after this long, e.g. 600s (what was measured is "
                   "cached: run again to go on)")
    s.add_argument("--budget", required=True, help="planned training memory, e.g. 2MB, 512KiB")
    s.add_argument("--latency", help="step time on this machine, e.g. 30ms, or a scheme whose step the chosen one "
                   "may not exceed, e.g. lora (timed alternately); the chosen scheme's step is compiled and timed")
    s.add_argument("--input-shape", type=_shape, help="compiled shape, batch first (default: the model's)")
    s.add_argument("--epochs", type=_at_least(1), help="epochs of each option's short fine-tune (default 6)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache", metavar="DIR", help="contribution cache (default ~/.cache/pock_tvm/search)")
    s.add_argument("-o", "--output", required=True, help="the scheme file to write (.toml)")

    d = sub.add_parser("demo", help="adapt a pretrained digits CNN to a new sensor: search the scheme within a "
                       "memory budget, compare with bias-only and full fine-tuning, run it on the emulated rpi4")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--epochs", type=_at_least(1), default=30, help="epochs of the final fine-tunes")
    d.add_argument("--budget-fraction", type=_number(1e-6, 1.0), default=0.25,
                   help="memory budget as a fraction of full fine-tuning's planned training memory")
    d.add_argument("--no-board", action="store_true", help="skip the emulated rpi4 run")

    f = sub.add_parser("fleet", help="federated sparse fine-tuning on Flower: the demo's digits task on N devices "
                       "(SuperNodes on loopback), against centralized training of the same scheme")
    f.add_argument("--out", default="out/fleet")
    f.add_argument("--nodes", type=_at_least(2), default=8)
    f.add_argument("--rounds", type=_at_least(1), default=8)
    f.add_argument("--local-epochs", type=_at_least(1), default=10)
    return parser


def _optimizer(args):
    from ..optim import make_optimizer

    settings = {"lr": args.lr, "weight_decay": args.weight_decay or None}  # None: the optimizer's default
    if args.optimizer == "sgd":
        settings["momentum"] = args.momentum
    return make_optimizer(args.optimizer, **settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "train" else logging.WARNING,
                        format="%(message)s")
    from . import commands, demo  # imports TVM: after parsing, so --help stays fast

    try:
        if args.command == "compile":
            from ..options import PipelineOptions

            options = PipelineOptions.preset(args.opt).without(*args.disable)
            program = commands.compile_to_dir(args.model, args.output, args.scheme, args.target,
                                              args.input_shape, args.loss, _optimizer(args), options, args.force,
                                              args.tuning_db, args.verify, args.prefix_cache)
            print(program.report())
            print(f"\nwrote {args.output}")
        elif args.command == "export":
            path, diff = commands.export_onnx(args.bundle, args.output, args.model, args.force)
            print(f"wrote {path} (ONNX Runtime agrees with the bundle: largest difference {diff:.2g})")
        elif args.command == "quantize":
            from ..export.quantize_onnx import quantize_onnx

            found = quantize_onnx(args.model, args.calibration, args.output, args.force)
            agree = found["top1_agreement"]
            print(f"wrote {args.output}: {found['quantized_nodes']} quantized tensors; on the calibration samples "
                  + (f"the int8 model's top-1 agrees with the float model's on {100 * agree:.1f}%, " if agree is not None
                     else "") + f"largest output difference {found['max_abs_diff']:.3g}")
        elif args.command == "info":
            print(commands.info(args.program))
        elif args.command == "train":
            losses = commands.train(args.program, args.data, args.epochs, args.lr, not args.no_save,
                                    args.prefix_cache)
            print(f"{len(losses)} steps, loss {losses[0]:.5f} -> {losses[-1]:.5f}")
        elif args.command == "build-runner":
            from ..targets.runner_build import build_runner

            print(f"built {build_runner(args.target, args.output)}/pock_runner")
        elif args.command == "pack-data":
            print(f"wrote {commands.pack_data(args.bundle, args.data, args.output)} batches to {args.output}")
        elif args.command == "run":
            from .remote import run_remote

            rows = run_remote(args.bundle, args.data, args.rpc, args.steps, args.lr)
            for row in rows:
                print(f"step {row['step']} loss {row['loss']:.7g} time_ms {row['time_ms']:.3f}")
            print(f"steps {len(rows)} mean_time_ms {sum(r['time_ms'] for r in rows) / len(rows):.3f}")
        elif args.command == "tune":
            from ..compiler.tuning_device import TuningDevice

            device = TuningDevice(rpc=args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout)
            if args.refresh_defaults:
                db, measured = commands.refresh_defaults(args.db, args.target, device)
                print(f"{measured} kernels measured in {db}")
                return 0
            if args.model is None:
                raise ValueError("tune: give a MODEL (or --refresh-defaults)")
            db, rows = commands.tune_model(args.model, args.db, args.scheme, args.input_shape, args.loss,
                                           args.kernels, args.trials, args.target, device)
            print(f"{sum(r.status == 'tuned' for r in rows)} kernels tuned into {db}")
        elif args.command == "profile":
            from ..runtime.profile import format_profile, profile, sgemm_peak

            print(format_profile(*profile(args.bundle, args.steps), args.top, peak=sgemm_peak()))
        elif args.command == "search":
            from .search import search_command

            result = search_command(args.model, args.data, args.budget, args.output, args.latency,
                                    args.input_shape, args.seed, args.epochs, args.cache, loss=args.loss, lr=args.lr,
                                    batch=args.batch, samples=args.samples, last_blocks=args.last_blocks,
                                    time_budget=args.time_budget, lora_ranks=args.lora_ranks,
                                    metric=args.metric)
            print(result.table())
            print(f"\nwrote {args.output}")
        elif args.command == "fleet":
            from .fleet import FleetSettings, fleet

            fleet(args.out, FleetSettings(nodes=args.nodes, rounds=args.rounds, local_epochs=args.local_epochs,
                                          min_nodes=max(2, args.nodes // 2)))
        elif args.command == "demo":
            demo.demo(args.out, demo.DemoSettings(epochs=args.epochs, budget_fraction=args.budget_fraction),
                      board=not args.no_board)
    except (ValueError, OSError, RecursionError) as err:
        # bad input (a clear ValueError), or a file that cannot be read or written: one line, no traceback
        print(f"pock-tvm {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pock-tvm {args.command}: interrupted; files being written were left as they were", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- not bad input: a bug, reported without a wall of traceback
        if args.verbose:
            raise
        last = (str(err).strip().splitlines() or [""])[-1]
        print(f"pock-tvm {args.command}: internal error: {type(err).__name__}: {last}; run again with -v for the "
              "traceback and report it", file=sys.stderr)
        return 1
    return 0


def _message(err: BaseException) -> str:
    """``err`` as one line for a CLI user."""
    if isinstance(err, RecursionError):
        return "the input nests too deep to read"
    if isinstance(err, OSError) and err.strerror:
        where = f" '{err.filename}'" if err.filename else ""
        hint = {28: " (the disk is full)", 30: " (read-only file system)", 13: " (no permission)",
                21: " (it is a directory; give a file name)", 20: " (a part of the path is a file)"}
        return f"{err.strerror}{where}{hint.get(err.errno, '')}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
