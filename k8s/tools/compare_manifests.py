#!/usr/bin/env python3
"""Checks that two multi-document YAML files hold the same Kubernetes objects.

Order-insensitive where Kubernetes is: documents are matched by (apiVersion, kind, name), and
lists of objects keyed by `name` or `mountPath` (containers, env, volumes, ports, mounts) are
compared as sets. A ConfigMap key `run.toml` is compared as a run config: both sides go through
`ferroclip config`, which fills in every default, so comments and omitted defaults do not count.

Usage: compare_manifests.py A.yaml B.yaml [--ferroclip BIN]
Exit 0 when equal, 1 with the differing paths printed otherwise.
"""
import os
import subprocess
import sys
import tempfile

import yaml


def canonical_config(text, ferroclip):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run([ferroclip, "config", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"compare_manifests: ferroclip config failed: {out.stderr.strip()}")
    return out.stdout


def normalize(value, ferroclip):
    if isinstance(value, dict):
        out = {k: normalize(v, ferroclip) for k, v in value.items()}
        if value.get("kind") == "ConfigMap" and ferroclip and "run.toml" in value.get("data", {}):
            out["data"]["run.toml"] = canonical_config(value["data"]["run.toml"], ferroclip)
        return out
    if isinstance(value, list):
        items = [normalize(v, ferroclip) for v in value]
        for key in ("name", "mountPath"):
            if items and all(isinstance(i, dict) and key in i for i in items):
                return sorted(items, key=lambda i: str(i[key]))
        return items
    return value


def diff(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'second' if k not in a else 'first'}")
            else:
                diff(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for n, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{n}]", out)
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")


def load(path, ferroclip):
    with open(path, encoding="utf-8") as f:
        docs = [normalize(d, ferroclip) for d in yaml.safe_load_all(f) if d is not None]
    return {(d.get("apiVersion"), d.get("kind"), d.get("metadata", {}).get("name")): d for d in docs}


def main():
    args = sys.argv[1:]
    ferroclip = None
    if "--ferroclip" in args:
        i = args.index("--ferroclip")
        ferroclip = args[i + 1]
        del args[i : i + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (load(p, ferroclip) for p in args)
    problems = []
    for ident in sorted(set(a) | set(b), key=str):
        if ident not in a or ident not in b:
            problems.append(f"{ident}: only in {args[0] if ident in a else args[1]}")
        else:
            diff(a[ident], b[ident], f"{ident[1]}/{ident[2]}", problems)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if problems:
        print(f"compare_manifests: {args[0]} and {args[1]} differ in {len(problems)} place(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
