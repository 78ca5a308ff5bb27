"""Exports one split of a ferroclip dataset to OpenCLIP's CSV format: the image bytes as files
(unchanged, not re-encoded) and a CSV with `filepath,title` columns, rows in shard order.

    .venv-bench/bin/python bench/export_csv.py DATA_DIR OUT_DIR [--split train]
    → OUT_DIR/images/NNNNNNN.jpg, OUT_DIR/train.csv
"""

import argparse
import csv
import json
import os

import pyarrow.parquet as pq


def extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError(f"unknown image format (first bytes {data[:8]!r})")


def export(data_dir, out_dir, split):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if split not in manifest["splits"]:
        raise SystemExit(f"{data_dir}: no split {split!r} (has {sorted(manifest['splits'])})")
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{split}.csv")
    n = 0
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for shard in manifest["splits"][split]["shards"]:
            table = pq.read_table(os.path.join(data_dir, shard["path"]), columns=["image", "caption"])
            for img, cap in zip(table.column("image").to_pylist(), table.column("caption").to_pylist()):
                path = os.path.abspath(os.path.join(images, f"{n:07d}.{extension(img)}"))
                with open(path, "wb") as g:
                    g.write(img)
                w.writerow([path, cap])
                n += 1
    expected = manifest["splits"][split]["rows"]
    if n != expected:
        raise SystemExit(f"exported {n} rows but the manifest says {expected}")
    return csv_path, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--split", default="train")
    a = ap.parse_args()
    csv_path, n = export(a.data_dir, a.out_dir, a.split)
    print(json.dumps({"csv": csv_path, "rows": n}))


if __name__ == "__main__":
    main()
