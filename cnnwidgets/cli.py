"""The ``cnnwidgets`` command line.

    cnnwidgets dissect --model efficientnet_lite0 --layers _blocks.2 _blocks.4._bn0 \\
        --synthetic 1000 --size 112 --out dissection.npz
    cnnwidgets dissect --model resnet18 --broden /data/broden1_224 --layers layer4 --out r18.npz
    cnnwidgets evaluate --model resnet50 --data /data/ILSVRC2012_val --methods grad_cam fixations \
        --out e.npz
    cnnwidgets evaluate --synthetic 40 --methods grad_cam fixations --out e.npz

Under ``torchrun --nproc_per_node N cnnwidgets dissect ...`` (or ``python -m torch.distributed.run
... -m cnnwidgets.cli dissect ...``) every process takes a shard of the data set (gloo backend on
CPU, nccl on GPU) and rank 0 saves the merged result, identical to a one-process run; the same
for ``evaluate``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import time
from pathlib import Path

PROG = "cnnwidgets"


# ----------------------------------------------------------------------------- argument types
def _int_at_least(low: int, what: str = ""):
    """An argparse ``type``: an integer ≥ ``low`` (``what`` says why, in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least {low}"
                                             + (f" ({what})" if what else ""))
        return value

    parse.__name__ = "int"
    return parse


def _fraction(*, open_low: bool, open_high: bool):
    """An argparse ``type``: a number between 0 and 1 (each end in or out)."""
    low, high = ("(" if open_low else "["), (")" if open_high else "]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = math.isfinite(value) and (0 < value if open_low else 0 <= value) \
            and (value < 1 if open_high else value <= 1)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number in "
                                             f"{low}0, 1{high}")
        return value

    parse.__name__ = "float"
    return parse


def _device(text: str) -> str:
    """An argparse ``type``: a torch device that exists on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda, cuda:N or "
                                         "mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine "
                                             "(no GPU, or torch built without CUDA); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA "
                                             f"device(s), cuda:0–cuda:{count - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; "
                                             "use cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: cnnwidgets runs on cpu, cuda or mps")
    return text


def _folder(text: str) -> str:
    """An argparse ``type``: an existing folder."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder (give the root of a local "
                                         "Broden copy, the folder with index.csv)")
    return text


def _out_path(text: str) -> Path:
    """Where ``--out`` writes: inside it when it names a folder (an existing one, or a path
    ending in a separator, made when the result is saved), else that file with ``.npz`` added
    when missing. Checked before the dissection starts, so a bad place fails at once."""
    from .engine.dissection import DEFAULT_FILE

    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        path = path / DEFAULT_FILE
    elif path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--out {text!r}: {str(existing)!r} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise ValueError(f"--out {text!r}: cannot write in {str(existing)!r} (permission "
                         "denied); pick another place")
    return path


# ----------------------------------------------------------------------------- the command
def _load_model(spec: str, pretrained: bool):
    from .engine import Model, load_model

    if ":" in spec:  # "package.module:factory" returning an nn.Module or a cw.Model
        module_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except ImportError as exc:
            raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({exc}); the "
                             "module must be importable from here (on PYTHONPATH)") from exc
        except AttributeError:
            raise ValueError(f"--model {spec!r}: {module_name!r} has no {attr!r}") from None
        obj = obj() if callable(obj) and not hasattr(obj, "forward") else obj
        return obj if isinstance(obj, Model) else Model(obj)
    return load_model(spec, pretrained=pretrained)


def _parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dissect", help="network dissection of some layers, saved to a file")
    d.add_argument("--model", default="efficientnet_lite0",
                   help="a cw.load_model name, or 'module:factory' returning an nn.Module")
    d.add_argument("--random-weights", action="store_true",
                   help="random weights (pretrained=False) for a torchvision model")
    d.add_argument("--layers", nargs="+", required=True, help="layer names (model.layers())")
    data = d.add_mutually_exclusive_group()
    data.add_argument("--synthetic", type=_int_at_least(1), default=1000, metavar="N",
                      help="dissect on N SyntheticConcepts images (default)")
    data.add_argument("--broden", type=_folder, metavar="ROOT",
                      help="dissect on a local Broden copy")
    d.add_argument("--size", type=_int_at_least(16, "the synthetic images' side in pixels"),
                   default=112, help="synthetic image size in pixels (at least 16)")
    d.add_argument("--seed", type=int, default=0, help="synthetic data set seed")
    d.add_argument("--quantile", type=_fraction(open_low=True, open_high=True), default=0.005,
                   help="top fraction of each unit's activations that counts as on, in (0, 1)")
    d.add_argument("--iou-threshold", type=_fraction(open_low=False, open_high=False),
                   default=0.04, help="IoU a detector reaches, in [0, 1]")
    d.add_argument("--batch-size", type=_int_at_least(1), default=32)
    d.add_argument("--workers", type=_int_at_least(0), default=0, help="DataLoader workers")
    d.add_argument("--features", choices=["disk", "recompute"], default="disk")
    d.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:N or mps; default: where the model is")
    d.add_argument("--out", required=True,
                   help="where to save the result (.npz); a folder gets a dissection.npz inside")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")

    e = sub.add_parser("evaluate", help="attribution methods measured on images with boxes "
                       "(localisation, MaxBoxAcc, pointing, deletion, insertion)")
    e.add_argument("--model", default="efficientnet_lite0",
                   help="a cw.load_model name, or 'module:factory' returning an nn.Module")
    e.add_argument("--random-weights", action="store_true",
                   help="random weights (pretrained=False) for a torchvision model")
    e.add_argument("--methods", nargs="+", default=["grad_cam"],
                   help="attribution methods (cw.methods())")
    e.add_argument("--metrics", nargs="+", default=["localization", "pointing", "deletion",
                                                    "insertion"],
                   choices=["localization", "pointing", "deletion", "insertion"])
    e.add_argument("--targets", nargs="+", default=["label"], choices=["label", "top1"],
                   help="explain the true class (label) and / or the predicted one (top1)")
    source = e.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR_OR_CSV",
                        help="the ILSVRC validation layout (images + VOC XML) or a boxes CSV")
    source.add_argument("--synthetic", type=_int_at_least(1), default=40, metavar="N",
                        help="N images of the offline cw.datasets.SyntheticBoxes (default)")
    e.add_argument("--annotations", default=None,
                   help="the folder of the XML files, when not under --data")
    e.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="only the first N images of --data")
    e.add_argument("--seed", type=int, default=0, help="synthetic data set seed")
    e.add_argument("--threshold", type=_fraction(open_low=False, open_high=False),
                   default=0.2, help="the CAM box rule's fraction of the map's maximum")
    e.add_argument("--steps", type=_int_at_least(1), default=50,
                   help="steps of the deletion / insertion curves")
    e.add_argument("--batch-size", type=_int_at_least(1), default=16)
    e.add_argument("--workers", type=_int_at_least(0), default=0, help="DataLoader workers")
    e.add_argument("--cache-dir", default=None,
                   help="keep finished blocks here; a stopped run resumes from them")
    e.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:N or mps; default: where the model is")
    e.add_argument("--out", required=True, help="where to save the evaluation (.npz)")
    e.add_argument("--markdown", action="store_true", help="print the table as markdown")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    return parser


@contextlib.contextmanager
def _process_group(device):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), the default process group for the run (gloo on
    CPU, nccl on CUDA), destroyed after; nothing in a single process."""
    import torch.distributed as dist

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if (device or "").startswith("cuda") else "gloo")
        started = True
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _model_on_device(args):
    import torch.distributed as dist

    model = _load_model(args.model, pretrained=not args.random_weights)
    if args.device:
        device = args.device
        if device == "cuda" and dist.is_initialized():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        model.module.to(device)
    return model


def _dissect(args) -> int:
    from .engine.datasets import Broden, SyntheticConcepts
    from .engine.dissection import dissect

    out = _out_path(args.out)
    with _process_group(args.device):
        model = _model_on_device(args)
        if args.broden:
            dataset = Broden(args.broden)
        else:
            dataset = SyntheticConcepts(args.synthetic, args.size, args.seed)
        result = dissect(model, dataset, args.layers, args.quantile, args.iou_threshold,
                         batch_size=args.batch_size, num_workers=args.workers,
                         progress=not args.quiet, features=args.features)
        if _rank() == 0:
            path = result.save(out)
            print(f"saved {result!r} to {path}")
            for layer, counts in result.summary().items():
                print(f"  {layer}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _evaluate(args) -> int:
    from .engine.boxdata import ImageFolderBoxes, SyntheticBoxes
    from .engine.evaluation import evaluate

    out = Path(args.out)
    out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    with _process_group(args.device):
        model = _model_on_device(args)
        if args.data:
            if not Path(args.data).exists():
                raise ValueError(f"--data {args.data!r}: no such folder or file")
            dataset = ImageFolderBoxes(args.data, args.annotations, limit=args.limit)
        else:
            dataset = SyntheticBoxes(args.synthetic, seed=args.seed)
        started = time.perf_counter()
        result = evaluate(model, dataset, args.methods, args.metrics, targets=args.targets,
                          threshold=args.threshold, steps=args.steps,
                          batch_size=args.batch_size, num_workers=args.workers,
                          cache_dir=args.cache_dir, progress=not args.quiet)
        if _rank() == 0:
            seconds = time.perf_counter() - started
            path = result.save(out)
            print(f"evaluated {len(dataset)} images in {seconds:.2f} s; saved {result!r} to "
                  f"{path}")
            for target in result.targets:
                print(f"\ntarget: {target}")
                print(result.table("markdown" if args.markdown else "text", target=target))
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0: done, 1: an error, printed in one line
    on stderr — ``--debug`` shows its traceback —, 130: interrupted). Wrong arguments exit
    with status 2 and argparse's usage message."""
    args = _parser().parse_args(argv)
    try:
        return _evaluate(args) if args.command == "evaluate" else _dissect(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug for the rest
        if args.debug:
            raise
        message = str(exc) or type(exc).__name__
        print(f"{PROG} {args.command}: error: {message}\n(run with --debug for the full "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
