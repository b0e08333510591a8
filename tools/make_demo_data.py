"""Cut the bundled demo sample from ISBI 2012: held-out test slices 25-29, raw + labels.

Usage: python tools/make_demo_data.py ../shared/data/isbi2012 segkit/data
Prints a JSON line with the files written and their sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tifffile

SLICES = slice(25, 30)  # the agreed held-out test split, never used for training


def main(root: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, stem in (("train-volume.tif", "isbi_test_raw.tif"), ("train-labels.tif", "isbi_test_labels.tif")):
        data = tifffile.imread(Path(root) / name)[SLICES]
        target = out_dir / stem
        tifffile.imwrite(target, data, photometric="minisblack", compression="zlib",
                         compressionargs={"level": 9}, predictor=True, metadata={"axes": "ZYX"})
        written[stem] = target.stat().st_size
    print(json.dumps({"slices": [SLICES.start, SLICES.stop], "bytes": written}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
