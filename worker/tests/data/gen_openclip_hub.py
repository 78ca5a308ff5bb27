"""Generates the pretrained-weights fixture that worker/tests/pretrained.rs checks against: a tiny
OpenCLIP model with QuickGELU saved in the Hugging Face hub layout, loaded back by open_clip
itself ('local-dir:'), and its outputs.

Run from the repository root with a venv holding open_clip:
    python worker/tests/data/gen_openclip_hub.py
Writes, next to this script:
  openclip_hub/open_clip_config.json       {model_cfg, preprocess_cfg} as open_clip writes it
  openclip_hub/open_clip_model.safetensors the weights (fp16 to stay small; the references are
                                           computed by the fp32 model holding those fp16 values)
  openclip_hub_images/*.png                4 images at the model's input size
  openclip_hub_texts.txt                   4 captions, one a line
  openclip_hub_ref.safetensors             pixels (open_clip's preprocess of the images), tokens
                                           (open_clip's tokenizer), image_emb / text_emb (unit
                                           norm), loss (ClipLoss on that batch, the first step's)
"""
import os

import numpy as np
import open_clip
import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from pathlib import Path
from PIL import Image
from safetensors.torch import save_file

HERE = Path(os.path.dirname(os.path.abspath(__file__)))
HUB = HERE / "openclip_hub"
IMAGES = HERE / "openclip_hub_images"

# Vocabulary 49408 so the real CLIP tokenizer's ids fit; text width 8 keeps the token embedding
# (the largest tensor) under 1 MB in fp16.
CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2},
}
TEXTS = ["a red square", "a photo of a dog", "two blue circles on grass", "an empty room"]


def main():
    torch.manual_seed(0)
    m = open_clip.model.CLIP(**CFG)
    with torch.no_grad():
        # Biases and norms start at 0/1; randomise them so the test sees them.
        for k, p in m.named_parameters():
            if k.endswith("bias") or ".ln" in k or k.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    # What open_clip.create_model sets for OpenAI-style models (the config's preprocess_cfg).
    m.visual.image_mean = open_clip.constants.OPENAI_DATASET_MEAN
    m.visual.image_std = open_clip.constants.OPENAI_DATASET_STD
    HUB.mkdir(exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(HUB / "open_clip_model.safetensors"))
    save_config_for_hf(m, HUB / "open_clip_config.json", model_config=CFG)

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{HUB}")
    model = model.float().eval()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)

    IMAGES.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    size = CFG["vision_cfg"]["image_size"]
    paths = []
    for i in range(4):
        yy, xx = np.mgrid[0:size, 0:size]
        c = rng.uniform(0, 255, (3,))
        px = np.stack([(c[k] + 40 * np.sin((xx + k * yy) / (3 + i))) % 256 for k in range(3)], -1)
        p = IMAGES / f"img{i}.png"
        Image.fromarray(px.astype(np.uint8)).save(p)
        paths.append(p)
    (HERE / "openclip_hub_texts.txt").write_text("\n".join(TEXTS) + "\n")

    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        loss = open_clip.loss.ClipLoss()(img, txt, model.logit_scale.exp())
    save_file(
        {
            "pixels": pixels.contiguous(),
            "tokens": tokens.contiguous(),
            "image_emb": img.contiguous(),
            "text_emb": txt.contiguous(),
            "loss": loss.reshape(1).double(),
        },
        str(HERE / "openclip_hub_ref.safetensors"),
    )
    print("loss", loss.item())


if __name__ == "__main__":
    main()
