"""Generates the OpenCLIP reference data that worker/tests/openclip_ref.rs checks against.

Run from the repository root with the bench venv:
    .venv-bench/bin/python worker/tests/data/gen_openclip_ref.py
Writes, next to this script:
  openclip_shapes.json         state-dict names -> shapes for ViT-B-32, and parameter counts of
                               every preset (models built on the meta device: no memory, no init)
  openclip_tiny.safetensors    a tiny randomly initialised OpenCLIP CLIP (vocab 1000) ...
  openclip_tiny_io.safetensors ... fixed inputs and its eval-mode outputs
"""
import json
import os

import open_clip
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

# The bench shape from DESIGN.md (7.96 M parameters).
BENCH = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# A tiny model small enough to commit its weights.
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2},
}


def meta_model(cfg):
    with torch.device("meta"):
        return open_clip.model.CLIP(**cfg)


def main():
    out = {"counts": {}, "shapes": {}}
    for name in ["ViT-B-32", "ViT-B-16", "ViT-L-14"]:
        m = meta_model(open_clip.get_model_config(name))
        out["counts"][name] = sum(p.numel() for p in m.parameters())
        if name == "ViT-B-32":
            out["shapes"][name] = {k: list(v.shape) for k, v in m.state_dict().items()}
    out["counts"]["bench-7.96M"] = sum(p.numel() for p in meta_model(BENCH).parameters())
    with open(os.path.join(HERE, "openclip_shapes.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)

    torch.manual_seed(0)
    m = open_clip.model.CLIP(**TINY).eval()
    # OpenCLIP leaves biases and LayerNorm params at 0/1; randomise them so the test sees them.
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("bias") or ".ln" in k or k.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              os.path.join(HERE, "openclip_tiny.safetensors"))
    images = torch.randn(3, 3, 16, 16)
    # eot (999) is the highest id, as in CLIP's vocabulary; pooled at its first position.
    tokens = torch.tensor([[998, 5, 6, 7, 999, 0, 0, 0],
                           [998, 999, 0, 0, 0, 0, 0, 0],
                           [998, 1, 2, 3, 4, 5, 6, 999]])
    with torch.no_grad():
        img = m.encode_image(images)
        txt = m.encode_text(tokens)
    save_file({"images": images, "tokens": tokens, "image_features": img.contiguous(),
               "text_features": txt.contiguous()},
              os.path.join(HERE, "openclip_tiny_io.safetensors"))
    print(json.dumps(out["counts"]))


if __name__ == "__main__":
    main()
