"""PyTorch eager reference for `ferroclip-worker bench-step`: the same CLIP shape (OpenCLIP's CLIP
class), the same random batch shape, AdamW(0.9, 0.98, eps 1e-6), global-norm clipping, symmetric
InfoNCE; mean seconds of forward (incl. loss), backward, optimizer over timed steps.

    .venv-bench/bin/python bench/step_torch.py --preset tiny --batch 64 --steps 20 --threads 2

--grad-checkpointing is OpenCLIP's (`model.set_grad_checkpointing()`, what its trainer's flag
calls); --accum-freq N splits --batch into N micro-batches with OpenCLIP's trainer algorithm
(open_clip_train/train.py: features of every micro-batch without grad, then each micro-batch again
with grad, its rows put back into the cached features, the full-batch loss back-propagated). With
accumulation the forward/backward split is not separated: forward_s holds both.
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
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--accum-freq", type=int, default=1)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TINY if a.preset == "tiny" else open_clip.get_model_config(a.preset)
    model = open_clip.model.CLIP(**cfg).train()
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
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

    def clip_loss(img, txt, scale):
        logits = scale * img @ txt.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    micro = list(zip(images.chunk(a.accum_freq), tokens.chunk(a.accum_freq)))
    fwd = bwd = optim = total = 0.0
    for i in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        if a.accum_freq == 1:
            loss = clip_loss(*model(images, tokens))
            t1 = time.perf_counter()
            loss.backward()
        else:
            with torch.no_grad():
                cached = [model(im, tk) for im, tk in micro]
            imgs = [c[0] for c in cached]
            txts = [c[1] for c in cached]
            for j, (im, tk) in enumerate(micro):
                img, txt, scale = model(im, tk)
                loss = clip_loss(torch.cat(imgs[:j] + [img] + imgs[j + 1:]),
                                 torch.cat(txts[:j] + [txt] + txts[j + 1:]), scale)
                loss.backward()
            t1 = time.perf_counter()
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
                      "grad_checkpointing": a.grad_checkpointing, "accum_freq": a.accum_freq,
                      "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters()), "data_s": 0.0,
                      "forward_s": round(fwd / n, 5), "backward_s": round(bwd / n, 5),
                      "optimizer_s": round(optim / n, 5), "step_s": round(total / n, 5)}))


if __name__ == "__main__":
    main()
