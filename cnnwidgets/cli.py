"""The ``cnnwidgets`` command line.

    cnnwidgets dissect --model efficientnet_lite0 --layers _blocks.2 _blocks.4._bn0 \\
        --synthetic 1000 --size 112 --out dissection.npz
    cnnwidgets dissect --model resnet18 --broden /data/broden1_224 --layers layer4 --out r18.npz

Under ``torchrun --nproc_per_node N cnnwidgets dissect ...`` (or ``python -m torch.distributed.run
... -m cnnwidgets.cli dissect ...``) every process takes a shard of the data set (gloo backend on
CPU, nccl on GPU) and rank 0 saves the merged result, identical to a one-process run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _load_model(spec: str, pretrained: bool):
    from .engine import Model, load_model

    if ":" in spec:  # "package.module:factory" returning an nn.Module or a cw.Model
        module_name, attr = spec.split(":", 1)
        obj = getattr(importlib.import_module(module_name), attr)
        obj = obj() if callable(obj) and not hasattr(obj, "forward") else obj
        return obj if isinstance(obj, Model) else Model(obj)
    return load_model(spec, pretrained=pretrained)


def _parser():
    parser = argparse.ArgumentParser(prog="cnnwidgets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dissect", help="network dissection of some layers, saved to a file")
    d.add_argument("--model", default="efficientnet_lite0",
                   help="a cw.load_model name, or 'module:factory' returning an nn.Module")
    d.add_argument("--random-weights", action="store_true",
                   help="random weights (pretrained=False) for a torchvision model")
    d.add_argument("--layers", nargs="+", required=True, help="layer names (model.layers())")
    data = d.add_mutually_exclusive_group()
    data.add_argument("--synthetic", type=int, default=1000, metavar="N",
                      help="dissect on N SyntheticConcepts images (default)")
    data.add_argument("--broden", metavar="ROOT", help="dissect on a local Broden copy")
    d.add_argument("--size", type=int, default=112, help="synthetic image size in pixels")
    d.add_argument("--seed", type=int, default=0, help="synthetic data set seed")
    d.add_argument("--quantile", type=float, default=0.005)
    d.add_argument("--iou-threshold", type=float, default=0.04)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    d.add_argument("--features", choices=["disk", "recompute"], default="disk")
    d.add_argument("--device", default=None, help="e.g. cuda; default: where the model is")
    d.add_argument("--out", required=True, help="where to save the result (.npz)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch.distributed as dist

    from .engine.datasets import Broden, SyntheticConcepts
    from .engine.dissection import dissect

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if (args.device or "").startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        started = True
    try:
        model = _load_model(args.model, pretrained=not args.random_weights)
        if args.device:
            device = args.device
            if device == "cuda" and dist.is_initialized():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            model.module.to(device)
        if args.broden:
            dataset = Broden(args.broden)
        else:
            dataset = SyntheticConcepts(args.synthetic, args.size, args.seed)
        result = dissect(model, dataset, args.layers, args.quantile, args.iou_threshold,
                         batch_size=args.batch_size, num_workers=args.workers,
                         progress=not args.quiet, features=args.features)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            path = result.save(args.out)
            print(f"saved {result!r} to {path}")
            for layer, counts in result.summary().items():
                print(f"  {layer}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
