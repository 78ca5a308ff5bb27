"""Interop check: a ferroclip model.safetensors loads into OpenCLIP's CLIP with strict=True.

    FERROCLIP_KEEP_CHECKPOINT=/tmp/ck cargo test -p ferroclip-worker --test checkpoint_resume resume
    .venv-bench/bin/python worker/tests/data/check_openclip_load.py /tmp/ck/step-00000003
The checkpoint there has the test's custom shape (below).
"""
import sys

import open_clip
import torch
from safetensors.torch import load_file

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 300, "width": 32, "heads": 2, "layers": 2},
}

model = open_clip.model.CLIP(**CFG)
sd = load_file(sys.argv[1] + "/model.safetensors")
print(model.load_state_dict(sd, strict=True))
with torch.no_grad():
    f = model.encode_image(torch.randn(2, 3, 16, 16), normalize=True)
print("ok: loaded", len(sd), "tensors; image features", tuple(f.shape), "logit_scale", float(model.logit_scale))
