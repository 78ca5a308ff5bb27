"""Image pipeline baseline: Pillow + torchvision, exactly OpenCLIP's training transform
(RandomResizedCrop(224, scale=(0.9, 1.0), bicubic) → RGB → ToTensor → CLIP Normalize), one
thread, over the JPEGs of a Parquet shard (read into memory first; only the pipeline is timed).

Also makes the shard when asked: `image_baseline.py make SHARD [N]` (256x256 JPEG q90).
Usage: image_baseline.py run SHARD [--passes 3] [--interpolation bicubic|bilinear]
Prints one JSON line: {"impl": ..., "img_per_s": best pass, "passes": [...]}.
"""
import argparse
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make(path, n, seed=0):
    """Photo-like 256x256 images: smooth colour fields, edges and sensor noise, JPEG q90."""
    rng = np.random.default_rng(seed)
    keys, images, captions = [], [], []
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 256.0
    for i in range(n):
        f = rng.uniform(1, 6, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=(3, 2))
        img = np.stack([
            127 + 90 * np.sin(f[c, 0] * 6.3 * xx + ph[c, 0]) * np.cos(f[c, 1] * 6.3 * yy + ph[c, 1])
            for c in range(3)
        ], axis=-1)
        # a few hard-edged rectangles and per-pixel noise, like objects and sensor grain
        for _ in range(4):
            x0, y0 = rng.integers(0, 200, size=2)
            w, h = rng.integers(20, 120, size=2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, size=img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        keys.append(f"bench-{i:06d}")
        images.append(buf.getvalue())
        captions.append(f"synthetic picture number {i}")
    table = pa.table({"key": keys, "image": pa.array(images, pa.binary()), "caption": captions,
                      "width": pa.array([256] * n, pa.int32()), "height": pa.array([256] * n, pa.int32())})
    pq.write_table(table, path, row_group_size=256)
    print(json.dumps({"made": path, "rows": n}))


def run(path, passes, interpolation):
    import torch
    import torchvision.transforms as T
    from open_clip.transform import image_transform

    torch.set_num_threads(1)
    images = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    if interpolation == "bicubic":
        tf = image_transform(224, is_train=True)  # OpenCLIP's own training transform
    else:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        tf = T.Compose([
            T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BILINEAR),
            lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ])
    for b in images[:32]:  # warm-up
        tf(Image.open(io.BytesIO(b)))
    rates, cpu_rates = [], []
    for _ in range(passes):
        start, cpu0 = time.perf_counter(), time.process_time()
        for b in images:
            x = tf(Image.open(io.BytesIO(b)))
        rates.append(len(images) / (time.perf_counter() - start))
        # images per CPU-second: robust when other processes share the core
        cpu_rates.append(len(images) / max(time.process_time() - cpu0, 1e-9))
    assert tuple(x.shape) == (3, 224, 224)
    print(json.dumps({"impl": f"pillow+torchvision ({interpolation})", "images": len(images),
                      "img_per_s": max(rates), "passes": rates,
                      "cpu_img_per_s": max(cpu_rates)}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("shard")
    m.add_argument("n", type=int, nargs="?", default=2000)
    r = sub.add_parser("run")
    r.add_argument("shard")
    r.add_argument("--passes", type=int, default=3)
    r.add_argument("--interpolation", choices=["bicubic", "bilinear"], default="bicubic")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.shard, a.n)
    else:
        run(a.shard, a.passes, a.interpolation)


if __name__ == "__main__":
    main()
