"""Helpers of bench/train-openclip.sh (training throughput, ferroclip vs OpenCLIP's trainer).

    train_report.py poll LAUNCHER_LOG OUT_JSON     record ferroclip's per-step commit times
    train_report.py params CHECKPOINT_DIR TOML     ferroclip checkpoint loads strictly into OpenCLIP
    train_report.py report OPENCLIP_TIMES FERRO_JSON --batch 256 [--openclip-wall S --ferroclip-wall S]

Throughput is measured the same way on both sides: (steps - 1) x global batch / (time of the
last optimizer step - time of the first), i.e. first step to last, startup excluded, everything
in between (data loading, epoch restarts, collectives) included.
"""

import argparse
import json
import re
import sys
import time
import urllib.request


def poll(log_path, out_path, timeout_s=3600.0, interval_s=0.2):
    """Finds the dashboard URL in `ferroclip train`'s log, then keeps the latest step history
    from /api/status until the launcher stops answering (it shuts down after the run)."""
    deadline = time.time() + timeout_s
    url = None
    while url is None:
        if time.time() > deadline:
            raise SystemExit(f"no dashboard line in {log_path}")
        try:
            with open(log_path, errors="replace") as f:
                m = re.search(r"dashboard: (http://[^/\s]+)/\?token=(\w+)", f.read())
        except FileNotFoundError:
            m = None
        if m:
            url = f"{m.group(1)}/api/status?token={m.group(2)}"
        else:
            time.sleep(interval_s)
    history, answered, misses = [], False, 0
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
            answered, misses = True, 0
            if len(body.get("history", [])) >= len(history):
                history = body["history"]
                with open(out_path, "w") as f:
                    json.dump({"history": history, "state": body.get("state")}, f)
        except (OSError, ValueError):
            misses += 1
            if answered and misses >= 3:
                break
        time.sleep(interval_s)
    print(json.dumps({"steps_recorded": len(history)}))


def params(ckpt_dir, toml_path):
    """Parameter counts of both models; the ferroclip checkpoint must load strictly into
    OpenCLIP's CLIP built from the same [model] section (same names and shapes)."""
    import open_clip
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from openclip_train_wrapper import openclip_model_config

    model = open_clip.model.CLIP(**openclip_model_config(toml_path))
    sd = load_file(f"{ckpt_dir}/model.safetensors")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    n_open = sum(p.numel() for p in model.parameters())
    n_ferro = sum(t.numel() for t in sd.values())
    print(json.dumps({"openclip_params": n_open, "ferroclip_params": n_ferro, "strict_load": "ok"}))
    if n_open != n_ferro:
        raise SystemExit(f"parameter counts differ: OpenCLIP {n_open}, ferroclip {n_ferro}")


def rate(times, batch):
    """(steps, seconds first→last, samples/s first→last, steady samples/s = batch / median
    step interval, which leaves out epoch restarts and other stalls)."""
    if len(times) < 2:
        raise SystemExit(f"need at least 2 step times, got {len(times)}")
    dt = times[-1] - times[0]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return len(times), dt, (len(times) - 1) * batch / dt, batch / gaps[len(gaps) // 2]


def report(openclip_times, ferro_json, batch, openclip_wall, ferro_wall):
    with open(openclip_times) as f:
        ot = [float(x) for x in f.read().split()]
    with open(ferro_json) as f:
        hist = json.load(f)["history"]
    steps = [h["step"] for h in hist]
    if not steps or steps != list(range(steps[0], steps[0] + len(steps))):
        raise SystemExit(f"{ferro_json}: the step history has gaps or is empty")
    short = [h["step"] for h in hist if h["samples"] != batch]
    if short:
        raise SystemExit(f"{ferro_json}: steps {short[:5]} did not use {batch} samples")
    ft = [h["unix_s"] for h in hist]
    rows = [("OpenCLIP 3.3.0 (torchrun, gloo)", rate(ot, batch), openclip_wall),
            ("ferroclip (ferroclip train --workers 2)", rate(ft, batch), ferro_wall)]
    base = rows[0][1][2]
    print("| trainer | steps | first→last step (s) | samples/s first→last | ratio | steady samples/s | whole command (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (n, dt, sps, steady), wall in rows:
        w = f"{wall:.1f}" if wall else "-"
        print(f"| {name} | {n} | {dt:.1f} | {sps:.1f} | {sps / base:.2f}x | {steady:.1f} | {w} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("poll")
    p.add_argument("log")
    p.add_argument("out")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p = sub.add_parser("params")
    p.add_argument("checkpoint")
    p.add_argument("toml")
    p = sub.add_parser("report")
    p.add_argument("openclip_times")
    p.add_argument("ferroclip_json")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--openclip-wall", type=float)
    p.add_argument("--ferroclip-wall", type=float)
    a = ap.parse_args()
    if a.cmd == "poll":
        poll(a.log, a.out, a.timeout_s)
    elif a.cmd == "params":
        params(a.checkpoint, a.toml)
    else:
        report(a.openclip_times, a.ferroclip_json, a.batch, a.openclip_wall, a.ferroclip_wall)


if __name__ == "__main__":
    main()
