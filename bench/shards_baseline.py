"""`shards build` baseline: the same work done with pyarrow + Pillow.

Reads a Parquet file of encoded images in batches, and per row: checks the caption (UTF-8,
non-empty after trimming), decodes the image fully, checks its size, drops exact duplicates (SHA-256
of the bytes), picks train/val from a hash of the key, optionally downscales to a short side of
RESIZE (bilinear) and re-encodes JPEG at QUALITY; then writes Parquet shards with ~4 MiB row groups
(image column uncompressed, others snappy). With --procs N the per-row work runs in a
multiprocessing pool (ordered), the main process reads and writes.

Usage: shards_baseline.py SRC.parquet OUT_DIR [--image-col image] [--resize 224] [--quality 90]
                          [--procs 1] [--rows-per-shard 100000]
Prints one JSON line: {"impl": "pyarrow+Pillow", "rows": .., "seconds": .., "rows_per_s": .., "mb_per_s": ..}.
"""
import argparse
import hashlib
import io
import json
import os
import time
from multiprocessing import Pool

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RESIZE = None
QUALITY = 90


def process(args):
    key, img, cap = args
    if cap is None:
        return None
    if isinstance(cap, bytes):
        try:
            cap = cap.decode("utf-8")
        except UnicodeDecodeError:
            return None
    cap = cap.strip()
    if not cap or img is None:
        return None
    try:
        im = Image.open(io.BytesIO(img))
        im.load()
    except Exception:
        return None
    w, h = im.size
    if min(w, h) < 1 or max(w, h) > 16384:
        return None
    digest = hashlib.sha256(img).digest()[:16]
    val = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64 < 0.0
    out = img
    if RESIZE is not None and min(w, h) > RESIZE:
        if w <= h:
            nw, nh = RESIZE, round(h * RESIZE / w)
        else:
            nw, nh = round(w * RESIZE / h), RESIZE
        im = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=QUALITY)
        out, w, h = buf.getvalue(), nw, nh
    return key, out, cap, w, h, digest, val


def init(resize, quality):
    global RESIZE, QUALITY
    RESIZE, QUALITY = resize, quality


class ShardWriter:
    SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                        ("width", pa.uint32()), ("height", pa.uint32())])

    def __init__(self, out_dir, rows_per_shard):
        self.dir, self.rows_per_shard = out_dir, rows_per_shard
        self.buf, self.buf_bytes, self.writer, self.shard_rows, self.n = [], 0, None, 0, 0
        os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)

    def push(self, row):
        self.buf.append(row)
        self.buf_bytes += len(row[1])
        if self.buf_bytes >= 4 << 20 or self.shard_rows + len(self.buf) >= self.rows_per_shard:
            self.flush()

    def flush(self):
        if not self.buf:
            return
        if self.writer is None:
            path = os.path.join(self.dir, "train", f"shard-{self.n:05d}.parquet")
            self.writer = pq.ParquetWriter(path, self.SCHEMA, compression={"key": "snappy", "image": "none",
                                           "caption": "snappy", "width": "snappy", "height": "snappy"},
                                           use_dictionary=["key", "caption"])
        cols = list(zip(*self.buf))
        self.writer.write_table(pa.table(cols, schema=self.SCHEMA))
        self.shard_rows += len(self.buf)
        self.buf, self.buf_bytes = [], 0
        if self.shard_rows >= self.rows_per_shard:
            self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer, self.shard_rows, self.n = None, 0, self.n + 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--image-col", default="image")
    p.add_argument("--resize", type=int)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--rows-per-shard", type=int, default=100000)
    a = p.parse_args()
    init(a.resize, a.quality)
    t0 = time.perf_counter()
    seen, rows, in_bytes = set(), 0, 0
    writer = ShardWriter(a.out, a.rows_per_shard)
    pool = Pool(a.procs, initializer=init, initargs=(a.resize, a.quality)) if a.procs > 1 else None

    def batches():
        nonlocal in_bytes
        for b in pq.ParquetFile(a.src).iter_batches(batch_size=128, columns=["key", a.image_col, "caption"]):
            keys = b.column("key").to_pylist()
            imgs = b.column(a.image_col).to_pylist()
            caps = b.column("caption").to_pylist()
            in_bytes += sum(len(i) for i in imgs if i)
            yield list(zip(keys, imgs, caps))

    def results():
        if pool is None:
            for batch in batches():
                yield [process(r) for r in batch]
        else:
            yield from pool.imap(lambda_free_map, batches(), chunksize=1)

    for out in results():
        for r in out:
            rows += 1
            if r is None or r[5] in seen:
                continue
            seen.add(r[5])
            writer.push(r[:5])
    writer.flush()
    writer.close()
    if pool is not None:
        pool.close()
    dt = time.perf_counter() - t0
    print(json.dumps({"impl": "pyarrow+Pillow", "procs": a.procs, "resize": a.resize, "rows": rows,
                      "seconds": round(dt, 3), "rows_per_s": round(rows / dt, 1),
                      "mb_per_s": round(in_bytes / 1e6 / dt, 2)}))


def lambda_free_map(batch):
    return [process(r) for r in batch]


if __name__ == "__main__":
    main()
