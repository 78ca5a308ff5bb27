"""All-reduce bus bandwidth of torch.distributed's gloo backend on loopback (the baseline for
bench/run-allreduce.sh). Same sizes, iteration counts and JSON lines as the Rust bench:
    .venv-bench/bin/python bench/allreduce_gloo.py --world 2 --sizes-mib 1,16,100
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank, args, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world
    )
    n = args.world
    for mib in args.sizes_mib:
        nbytes = mib << 20
        iters = args.iters if args.iters > 0 else max(5, min(200, 1024 // max(mib, 1)))
        t = torch.zeros(nbytes // 4, dtype=torch.float32)
        for _ in range(3):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        secs = (time.perf_counter() - start) / iters
        dist.barrier()
        if rank == 0:
            algbw = nbytes / secs / 1e9
            busbw = algbw * 2 * (n - 1) / n
            print(json.dumps({"impl": "torch-gloo", "dtype": "F32", "world": n, "bytes": nbytes,
                              "iters": iters, "ms": round(secs * 1e3, 3),
                              "algbw_gbs": round(algbw, 3), "busbw_gbs": round(busbw, 3)}),
                  flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes-mib", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 100])
    p.add_argument("--iters", type=int, default=0)
    args = p.parse_args()
    mp.spawn(run, args=(args, free_port()), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
