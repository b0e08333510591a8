"""Store a trained checkpoint as the bundled demo model, with float weights halved to fp16.

Usage: python tools/bundle_demo_model.py runs/em_neurons_small_cpu/best.safetensors segkit/data/unet_isbi_demo.safetensors

fp16 halves the package size; segkit loads the weights into a float32 model, so inference is
unchanged apart from the rounding of the weights (the README's demo numbers are measured on
the bundled file). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(source: str, target: str) -> None:
    from safetensors.torch import load_file, save_file

    from segkit.checkpoint import match_umask, read_info
    from segkit.io.outputs import atomic_path

    info = read_info(source)
    info.training = {**info.training, "bundled_from": Path(source).as_posix(), "weights_dtype": "float16"}
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(source).items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"segkit": info.to_json()})
        match_umask(tmp)
    print(json.dumps({"target": target, "bytes": Path(target).stat().st_size, "epoch": info.training.get("epoch"),
                      "validation": info.training.get("validation")}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
