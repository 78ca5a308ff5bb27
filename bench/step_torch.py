"""PyTorch eager reference for `ferroclip-worker bench-step`: the same CLIP shape (OpenCLIP's CLIP
class), the same random batch shape, AdamW(0.9, 0.98, eps 1e-6), global-norm clipping, symmetric
InfoNCE; mean seconds of forward (incl. loss), backward, optimizer over timed steps.

    .venv-bench/bin/python bench/step_torch.py --preset tiny --batch 64 --steps 20 --threads 2
"""
import argparse
import json
import time

import open_clip
import torch
import torch.nn.functional as F

TINY = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TINY if a.preset == "tiny" else open_clip.get_model_config(a.preset)
    model = open_clip.model.CLIP(**cfg).train()
    size = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"]["context_length"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    images = torch.randn(a.batch, 3, size, size)
    tokens = torch.randint(1, 49405, (a.batch, ctx))
    tokens[:, 0] = 49406
    tokens[:, -1] = 49407
    labels = torch.arange(a.batch)
    fwd = bwd = optim = total = 0.0
    for i in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        img, txt, scale = model(images, tokens)
        logits = scale * img @ txt.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        t3 = time.perf_counter()
        if i >= a.warmup:
            fwd += t1 - t0
            bwd += t2 - t1
            optim += t3 - t2
            total += t3 - t0
    n = a.steps
    print(json.dumps({"impl": "pytorch-eager", "preset": a.preset, "batch": a.batch,
                      "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters()), "data_s": 0.0,
                      "forward_s": round(fwd / n, 5), "backward_s": round(bwd / n, 5),
                      "optimizer_s": round(optim / n, 5), "step_s": round(total / n, 5)}))


if __name__ == "__main__":
    main()
