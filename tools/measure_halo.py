"""Measure how much context (halo) a same-padding model needs: blended tiles vs one whole-plane pass.

Usage:
  python tools/measure_halo.py --checkpoint runs/em_neurons_fcn8s/best.safetensors --tile 512
  python tools/measure_halo.py --model smp:Unet:resnet34 --tile 512 --halos 32 64 96 128

For each halo, a plane (ISBI slice 20 when --image is given, else noise) is predicted tile by tile
with blending and as one forward pass of the padded plane; prints the mean and max absolute
difference of the class-1 probability as one JSON line. Pick the smallest halo whose error is
negligible and set it in the recipe (model.params.halo) or at inference (segkit predict --halo).
Untrained models (--model) see much further than trained ones, so they overstate the need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--model", default="smp:Unet:resnet34")
    parser.add_argument("--params", default="{}", help="JSON kwargs for --model")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halos", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--image", type=Path, help="TIFF stack; slice --slice is used (default: noise)")
    parser.add_argument("--slice", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from segkit.checkpoint import load_model
    from segkit.inference.engines import TorchEngine
    from segkit.inference.tiler import pad_plane, plan_tiles, predict_plane
    from segkit.io.tiff import open_stack
    from segkit.models import create_model
    from segkit.normalization import Normalization

    if args.checkpoint:
        model, info = load_model(args.checkpoint)
        normalization, name = info.normalization, info.model
    else:
        torch.manual_seed(0)
        model, name = create_model(args.model, **json.loads(args.params)), args.model
        normalization = Normalization(0.0, 1.0)
    engine = TorchEngine(model, device=args.device, amp="none")
    if args.image:
        with open_stack(args.image) as stack:
            plane = stack.plane(args.slice).astype(np.float32)
    else:
        plane = np.random.default_rng(0).standard_normal((700, 650)).astype(np.float32)
    plane = normalization.apply(torch.from_numpy(plane))[None].to(engine.device)
    rows = []
    for halo in args.halos:
        geometry = dataclasses.replace(model.geometry, halo=halo)
        plan = plan_tiles(tuple(plane.shape[1:]), geometry, tile=args.tile)
        tiled = predict_plane(plane, engine, geometry, tile=args.tile, batch=4)[0]
        whole = engine(pad_plane(plane, plan)[None])[0, 0]
        whole = whole[halo : halo + plane.shape[1], halo : halo + plane.shape[2]]
        diff = (tiled - whole).abs().cpu().numpy()
        rows.append({"halo": halo, "tiles": plan.n_tiles, "mean_abs_diff": float(diff.mean()),
                     "max_abs_diff": float(diff.max())})
    print(json.dumps({"model": name, "tile": args.tile, "plane": list(plane.shape[1:]), "results": rows}))


if __name__ == "__main__":
    main()
