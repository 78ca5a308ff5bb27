"""Generates the preprocessing fixture that worker/tests/pretrained.rs checks against: the tiny
hub model of gen_openclip_hub.py (run that first) under three `preprocess_cfg`s, and open_clip's
own embeddings of 4 non-square images through each (so the resize, crop or padding matters).

Run from the repository root with a venv holding open_clip (bench/setup-python.sh makes one):
    python worker/tests/data/gen_openclip_preprocess.py
Writes, next to this script:
  openclip_hub_longest/  config with resize_mode longest, bilinear, fill_color 128; the weights
  openclip_hub_squash/   config with resize_mode squash (bicubic)  are links to openclip_hub's
  openclip_wide_images/*.png                 4 images of other sizes than the model's 32x32
  openclip_preprocess_ref.safetensors        {shortest,longest,squash}_image_emb (unit norm)
"""
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(os.path.dirname(os.path.abspath(__file__)))
HUB = HERE / "openclip_hub"
IMAGES = HERE / "openclip_wide_images"
MODES = {
    "longest": {"interpolation": "bilinear", "resize_mode": "longest", "fill_color": 128},
    "squash": {"interpolation": "bicubic", "resize_mode": "squash"},
}
SIZES = [(48, 40), (30, 50), (64, 20), (45, 45)]  # (width, height)


def hub_dir(mode):
    if mode == "shortest":
        return HUB
    d = HERE / f"openclip_hub_{mode}"
    d.mkdir(exist_ok=True)
    cfg = json.loads((HUB / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"].update(MODES[mode])
    (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    link = d / "open_clip_model.safetensors"
    if not link.is_symlink():
        link.symlink_to("../openclip_hub/open_clip_model.safetensors")
    return d


def main():
    IMAGES.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        c = rng.uniform(0, 255, (3,))
        px = np.stack([(c[k] + 60 * np.sin((xx + k * yy) / (2 + i))) % 256 for k in range(3)], -1)
        p = IMAGES / f"wide{i}.png"
        Image.fromarray(px.astype(np.uint8)).save(p)
        paths.append(p)
    out = {}
    for mode in ["shortest", *MODES]:
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{hub_dir(mode)}")
        model = model.float().eval()
        print(mode, preprocess)
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            out[f"{mode}_image_emb"] = model.encode_image(pixels, normalize=True).contiguous()
    save_file(out, str(HERE / "openclip_preprocess_ref.safetensors"))


if __name__ == "__main__":
    main()
