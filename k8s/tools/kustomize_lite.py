#!/usr/bin/env python3
"""Builds a kustomization directory without kubectl: the subset of kustomize that k8s/ uses.

Supported (anything else in a kustomization.yaml is an error, so nothing is silently ignored):
  resources (files and directories), namespace, patches with `path` (strategic-merge patch files;
  a patch whose top level says `$patch: delete` removes its target object),
  configMapGenerator (files, literals, behavior create/merge/replace, options.labels) with
  generatorOptions.disableNameSuffixHash: true.

Strategic merge follows Kubernetes' rules for the fields used here: maps merge recursively, a
null value deletes a key, lists of containers/env/volumes/ports/volumeMounts merge by their key
(and honour `$patch: delete`), every other list is replaced.

Usage: kustomize_lite.py DIR [--json]   (prints multi-document YAML, or a JSON list)
"""
import copy
import json
import os
import sys

import yaml

KNOWN_KEYS = {
    "apiVersion", "kind", "resources", "namespace", "patches", "configMapGenerator",
    "generatorOptions",
}
# Kubernetes' patchMergeKey for the list fields that k8s/ patches.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(Exception):
    pass


def merge_key(field, items):
    if field == "ports":  # container ports merge by containerPort, Service ports by port
        return "containerPort" if all("containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def strip_directives(value):
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return value


def merge(base, patch, where):
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return strip_directives(patch)
    if patch.get("$patch") == "replace":
        return strip_directives(patch)
    out = dict(base)
    for key, value in patch.items():
        if key == "$patch":
            continue
        if key.startswith("$"):
            raise KustomizeError(f"{where}: unsupported directive {key}")
        if value is None:
            out.pop(key, None)
        elif key in out and isinstance(value, list) and isinstance(out[key], list):
            out[key] = merge_list(key, out[key], value, f"{where}.{key}")
        elif key in out:
            out[key] = merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = strip_directives(value)
    return out


def merge_list(field, base, patch, where):
    items = [i for i in base + patch if isinstance(i, dict)]
    key = merge_key(field, items) if len(items) == len(base) + len(patch) else None
    if key is None:
        return strip_directives(patch)
    out = list(base)
    for item in patch:
        if key not in item:
            raise KustomizeError(f"{where}: patch item without merge key {key}: {item}")
        found = [n for n, b in enumerate(out) if b.get(key) == item[key]]
        if item.get("$patch") == "delete":
            out = [b for b in out if b.get(key) != item[key]]
        elif found:
            out[found[0]] = merge(out[found[0]], item, f"{where}[{key}={item[key]}]")
        else:
            out.append(strip_directives(item))
    return out


def ident(obj):
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def generate_config_map(gen, opts, root):
    data = {}
    for entry in gen.get("files", []):
        key, _, rel = entry.partition("=") if "=" in entry else (os.path.basename(entry), "", entry)
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            data[key] = f.read()
    for entry in gen.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    labels = {**opts.get("labels", {}), **gen.get("options", {}).get("labels", {})}
    meta = {"name": gen["name"]}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def build(root):
    path = os.path.join(root, "kustomization.yaml")
    with open(path, encoding="utf-8") as f:
        kust = yaml.safe_load(f) or {}
    unknown = set(kust) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    objects = []
    for res in kust.get("resources", []):
        full = os.path.join(root, res)
        objects += build(full) if os.path.isdir(full) else load_docs(full)

    opts = kust.get("generatorOptions", {})
    gens = kust.get("configMapGenerator", [])
    if gens and opts.get("disableNameSuffixHash") is not True:
        raise KustomizeError(f"{path}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true")
    for gen in gens:
        new = generate_config_map(gen, opts, root)
        behavior = gen.get("behavior", "create")
        at = [n for n, o in enumerate(objects) if ident(o) == ident(new)]
        if behavior == "create":
            if at:
                raise KustomizeError(f"{path}: ConfigMap {gen['name']} already exists")
            objects.append(new)
        elif not at:
            raise KustomizeError(f"{path}: ConfigMap {gen['name']} to {behavior} does not exist")
        elif behavior == "replace":
            objects[at[0]] = new
        elif behavior == "merge":
            old = objects[at[0]]
            old.setdefault("data", {}).update(new["data"])
            old["metadata"].setdefault("labels", {}).update(new["metadata"].get("labels", {}))
        else:
            raise KustomizeError(f"{path}: unsupported behavior {behavior}")

    for patch in kust.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{path}: only `patches: - path: FILE` is supported, got {patch}")
        for doc in load_docs(os.path.join(root, patch["path"])):
            at = [n for n, o in enumerate(objects) if ident(o) == ident(doc)]
            if not at:
                raise KustomizeError(f"{path}: patch {patch['path']} targets {ident(doc)}, which no resource is")
            if doc.get("$patch") == "delete":
                del objects[at[0]]
            else:
                objects[at[0]] = merge(objects[at[0]], doc, f"{patch['path']}")

    if "namespace" in kust:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return copy.deepcopy(objects)


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objects = build(args[0])
    except (KustomizeError, OSError, yaml.YAMLError) as e:
        print(f"kustomize_lite: {e}", file=sys.stderr)
        return 1
    if "--json" in args:
        json.dump(objects, sys.stdout, indent=1)
    else:
        yaml.safe_dump_all(objects, sys.stdout, sort_keys=True, explicit_start=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
