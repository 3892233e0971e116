"""Convert the Fly Brain enhancer benchmark pickle (DeepFlyBrain_data.pkl of Dirichlet flow
matching: ``{split}_data`` one-hot [N, 500, 4], ``y_{split}`` one-hot [N, 81]) into one .npz per
split with ``x`` (uint8 ids [N, 500], A C G T = 0..3) and ``y`` (int16 labels [N]), which
``data.corpus`` reads without any unpickling.

The pickle is read through ``domains.dna.read_benchmark_pickle`` (numpy arrays only), so a file
holding anything else is refused rather than run.

    python tools/flybrain_to_npz.py DeepFlyBrain_data.pkl OUT_DIR   # -> OUT_DIR/fb_train.npz, ...
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from coupling_dist.domains.dna import read_benchmark_pickle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pickle")
    ap.add_argument("out_dir")
    a = ap.parse_args()
    arrays = read_benchmark_pickle(a.pickle)
    os.makedirs(a.out_dir, exist_ok=True)
    for split in ("train", "valid", "test"):
        if f"{split}_data" not in arrays:
            continue
        x = np.asarray(arrays[f"{split}_data"]).argmax(-1).astype(np.uint8)
        y = np.asarray(arrays[f"y_{split}"]).argmax(-1).astype(np.int16)
        path = os.path.join(a.out_dir, f"fb_{split}.npz")
        np.savez(path, x=x, y=y)
        print(f"{path}: {len(x)} sequences of {x.shape[1]} bases, {int(y.max()) + 1} classes")


if __name__ == "__main__":
    main()
