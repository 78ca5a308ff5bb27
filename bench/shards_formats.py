"""Writes the rows of an img2dataset-style Parquet file (key, image, caption) as the other inputs
`shards build` reads, for bench/shards-formats.sh: webdataset tars of 1000 samples
(KEY.jpg/.txt/.json) and a COCO captions file over a folder of the same images.

Usage: shards_formats.py SRC.parquet OUTDIR
"""
import io
import json
import os
import sys
import tarfile

import pyarrow.parquet as pq


def main(src, out):
    table = pq.read_table(src)
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    captions = table.column("caption").to_pylist()
    os.makedirs(f"{out}/wds", exist_ok=True)
    os.makedirs(f"{out}/coco/images", exist_ok=True)
    tar = None
    for i, (key, img, cap) in enumerate(zip(keys, images, captions)):
        if i % 1000 == 0:
            if tar:
                tar.close()
            tar = tarfile.open(f"{out}/wds/{i // 1000:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        for ext, data in (("jpg", img), ("txt", cap.encode()), ("json", json.dumps({"key": key, "n": i}).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        with open(f"{out}/coco/images/{key}.jpg", "wb") as f:
            f.write(img)
    tar.close()
    coco = {
        "images": [{"id": i, "file_name": f"{k}.jpg"} for i, k in enumerate(keys)],
        "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)],
    }
    with open(f"{out}/coco/captions_train2017.json", "w") as f:
        json.dump(coco, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
