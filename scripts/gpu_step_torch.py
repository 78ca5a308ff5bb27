"""PyTorch eager reference for `ferroclip-worker gpu-check`: one CLIP training step (forward with
symmetric InfoNCE, backward, grad clipping, AdamW) of the same shape, bf16 autocast with fp32
weights, at the largest batch that fits; prints samples/s and MFU with the same FLOPs count.

Uses OpenCLIP's CLIP class when open_clip is installed, else a plain torch CLIP of the same shape.

    python scripts/gpu_step_torch.py --preset ViT-B-16 --device cuda
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# embed, image, patch, vision width, vision layers, text width, text layers, text heads, context
SHAPES = {
    "tiny": (128, 32, 4, 128, 4, 128, 4, 4, 32),
    "ViT-B-32": (512, 224, 32, 768, 12, 512, 12, 8, 77),
    "ViT-B-16": (512, 224, 16, 768, 12, 512, 12, 8, 77),
    "ViT-L-14": (768, 224, 14, 1024, 24, 768, 12, 12, 77),
}
PEAK_BF16_TFLOPS = [("B200", 2250), ("H200", 989), ("H100 PCIE", 756), ("H100", 989), ("H800", 989),
                    ("GH200", 989), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
                    ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165),
                    ("RTX 6000 ADA", 364), ("A6000", 155), ("RTX 3090", 71)]


def train_flops_per_sample(shape):
    """As ferroclip's gpu_check::clip_train_flops_per_sample: matmuls only, 3x forward."""
    embed, size, patch, w, layers, wt, tlayers, _, ctx = shape
    patches = (size // patch) ** 2
    n = patches + 1

    def layer(tokens, width):
        return 24 * tokens * width * width + 4 * tokens * tokens * width

    vision = 2 * patches * 3 * patch * patch * w + layers * layer(n, w) + 2 * w * embed
    text = tlayers * layer(ctx, wt) + 2 * wt * embed
    return 3.0 * (vision + text)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class PlainClip(nn.Module):
    """OpenCLIP's CLIP shape without OpenCLIP: pre-LN ViT (class token) and causal text tower."""

    def __init__(self, shape):
        super().__init__()
        embed, size, patch, w, layers, wt, tlayers, theads, ctx = shape
        self.conv1 = nn.Conv2d(3, w, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, w) * w ** -0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.visual = nn.ModuleList([Block(w, w // 64) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(w)
        self.visual_proj = nn.Parameter(torch.randn(w, embed) * w ** -0.5)
        self.token_embedding = nn.Embedding(49408, wt)
        self.text_pos = nn.Parameter(torch.randn(ctx, wt) * 0.01)
        self.text = nn.ModuleList([Block(wt, theads) for _ in range(tlayers)])
        self.ln_final = nn.LayerNorm(wt)
        self.text_projection = nn.Parameter(torch.randn(wt, embed) * wt ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("causal", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)

    def forward(self, images, tokens):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        for b in self.visual:
            x = b(x)
        img = self.ln_post(x[:, 0]) @ self.visual_proj
        t = self.token_embedding(tokens) + self.text_pos
        for b in self.text:
            t = b(t, self.causal)
        t = self.ln_final(t)
        txt = t[torch.arange(t.shape[0], device=t.device), tokens.argmax(-1)] @ self.text_projection
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.logit_scale.exp()


def build(preset, shape):
    try:
        import open_clip
    except ImportError:
        return PlainClip(shape), "plain torch CLIP (open_clip not installed)"
    if preset == "tiny":
        e, s, p, w, l, wt, tl, th, c = shape
        cfg = {"embed_dim": e, "vision_cfg": {"image_size": s, "patch_size": p, "width": w, "layers": l,
                                              "head_width": 32},
               "text_cfg": {"context_length": c, "vocab_size": 49408, "width": wt, "heads": th, "layers": tl}}
    else:
        cfg = open_clip.get_model_config(preset)
    return open_clip.model.CLIP(**cfg), f"open_clip {open_clip.__version__} CLIP"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ViT-B-16", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=0, help="0 = largest of --batches that fits")
    ap.add_argument("--batches", default="256,128,64,32,16,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="autocast-bf16", choices=["autocast-bf16", "fp32"])
    ap.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    shape = SHAPES[a.preset]
    model, what = build(a.preset, shape)
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    autocast = a.precision == "autocast-bf16" and dev.type == "cuda"
    size, ctx = shape[1], shape[8]

    def inputs(batch):
        images = torch.randn(batch, 3, size, size, device=dev)
        tokens = torch.randint(1, 49405, (batch, ctx), device=dev)
        tokens[:, 0] = 49406
        tokens[:, -1] = 49407
        return images, tokens, torch.arange(batch, device=dev)

    def step(images, tokens, labels):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(images, tokens)
            img, txt, scale = out[0], out[1], out[2]
            logits = scale * img @ txt.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    batch = a.batch
    if batch <= 0:
        for b in [int(x) for x in a.batches.split(",")]:
            try:
                step(*inputs(b))
                sync()
                batch = b
                break
            except torch.OutOfMemoryError:
                print(f"  batch {b}: does not fit")
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if batch <= 0:
            raise SystemExit("no batch fits")
    x = inputs(batch)
    for _ in range(a.warmup):
        step(*x)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step(*x)
    sync()
    secs = time.perf_counter() - t0
    steps_s = a.steps / secs
    samples_s = steps_s * batch
    flops = train_flops_per_sample(shape)
    achieved = samples_s * flops / 1e12
    peak = a.peak_tflops
    if peak is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).upper()
        peak = next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    mfu = achieved / peak if peak else None
    label = "bf16 autocast, fp32 master weights" if autocast else "fp32"
    print(f"pytorch eager ({what}) {a.preset} {label}: batch {batch}, {steps_s:.2f} steps/s, "
          f"{samples_s:.1f} samples/s, {achieved:.1f} TFLOP/s achieved, "
          f"MFU {'unknown' if mfu is None else f'{mfu * 100:.1f}%'}, last loss {loss.item():.3f}")
    print(json.dumps({"impl": "pytorch-eager", "model": what, "preset": a.preset, "precision": a.precision,
                      "batch": batch, "steps_per_s": round(steps_s, 4), "samples_per_s": round(samples_s, 2),
                      "tflops": round(achieved, 2), "flops_per_sample": flops, "peak_tflops": peak,
                      "mfu": None if mfu is None else round(mfu, 4), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
