"""Runs OpenCLIP's own trainer (`open_clip_train.main`) for the training-throughput benchmark.

Start it under torchrun:
    torchrun --standalone --nproc_per_node 2 bench/openclip_train_wrapper.py \
        --ferroclip-config configs/bench-openclip-shape.toml --step-times OUT.txt \
        --openclip-logs DIR <open_clip_train.main arguments, without --model and --logs>

What it adds to the stock trainer, without touching site-packages:
- OpenCLIP 3.3.0 passes `device_ids=[device]` to DDP also for a CPU module, which torch 2.11
  rejects; a DDP subclass drops `device_ids` when the module lives on the CPU.
- The model config is built from the ferroclip TOML's [model] section (one source of truth for
  the shape), registered as `ferroclip-shape` and passed as `--model`.
- `--openclip-logs DIR` stands for OpenCLIP's `--logs DIR`: torchrun's own parser rejects
  `--logs` as an ambiguous abbreviation of its `--logs-specs`.
- Rank 0 appends the wall-clock time of every optimizer step to --step-times (one float a line),
  so throughput is measured from the first step to the last like ferroclip's commit times.
"""

import json
import os
import sys
import tempfile
import time
import tomllib

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

MODEL_NAME = "ferroclip-shape"


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that ignores device_ids for a CPU module (torch rejects them there)."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def openclip_model_config(toml_path):
    """OpenCLIP's model config JSON for the [model] section of a ferroclip run.toml."""
    with open(toml_path, "rb") as f:
        m = tomllib.load(f).get("model", {})
    need = ["embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
            "context_length", "vocab_size", "text_width", "text_layers", "text_heads"]
    missing = [k for k in need if k not in m]
    if missing:
        raise SystemExit(f"{toml_path}: [model] must spell out {', '.join(missing)}")
    if m["vision_width"] % m["vision_heads"]:
        raise SystemExit(f"{toml_path}: vision_width is not a multiple of vision_heads")
    return {
        "embed_dim": m["embed_dim"],
        "vision_cfg": {
            "image_size": m["image_size"],
            "patch_size": m["patch_size"],
            "width": m["vision_width"],
            "layers": m["vision_layers"],
            "head_width": m["vision_width"] // m["vision_heads"],
        },
        "text_cfg": {
            "context_length": m["context_length"],
            "vocab_size": m["vocab_size"],
            "width": m["text_width"],
            "heads": m["text_heads"],
            "layers": m["text_layers"],
        },
    }


def take_option(argv, name):
    """Removes `name VALUE` from argv and returns VALUE (None when absent)."""
    if name not in argv:
        return None
    i = argv.index(name)
    if i + 1 >= len(argv):
        raise SystemExit(f"{name} needs a value")
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def register_model(toml_path):
    import open_clip

    cfg = openclip_model_config(toml_path)
    tmp = tempfile.mkdtemp(prefix="openclip-shape-")
    path = os.path.join(tmp, f"{MODEL_NAME}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)
    return cfg


def record_step_times(path):
    """Rank 0 appends time.time() after every optimizer step (any optimizer)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = open(path, "a", buffering=1)

    def hook(_optimizer, _args, _kwargs):
        out.write(f"{time.time():.6f}\n")

    register_optimizer_step_post_hook(hook)


def main():
    argv = sys.argv[1:]
    toml_path = take_option(argv, "--ferroclip-config")
    if toml_path is None:
        raise SystemExit("--ferroclip-config PATH (the ferroclip run.toml giving the shape) is required")
    step_times = take_option(argv, "--step-times")
    logs = take_option(argv, "--openclip-logs")
    if logs is not None:
        argv += ["--logs", logs]
    if "--model" in argv:
        raise SystemExit("--model is set by the wrapper from --ferroclip-config")
    register_model(toml_path)
    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel
    if step_times:
        record_step_times(step_times)
    from open_clip_train.main import main as openclip_main

    openclip_main(["--model", MODEL_NAME] + argv)


if __name__ == "__main__":
    main()
