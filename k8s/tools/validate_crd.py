#!/usr/bin/env python3
"""Validates custom resources offline against their CustomResourceDefinition's openAPIV3Schema,
strictly, as kubernetes-validate --strict does for built-in kinds: an unknown field fails (the API
server would prune it silently), as do wrong types, enums and missing required fields.

The CRD schema becomes a JSON Schema: every object schema that lists `properties` gets
`additionalProperties: false` (unless it says x-kubernetes-preserve-unknown-fields), an
`x-kubernetes-int-or-string` field accepts an integer or a string, `nullable` admits null.
Documents of other kinds in the files are skipped; a file with no document of the CRD's kind fails.

Usage: validate_crd.py CRD.yaml FILE...   (needs PyYAML and jsonschema, which
kubernetes-validate installs)
"""
import sys

import jsonschema
import yaml


def strict(schema):
    """The CRD's structural schema as a strict JSON Schema (a new dict)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {k: strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crd(path):
    with open(path, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schemas = {}
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        # apiVersion, kind and metadata are the API server's; the rest is the CRD's.
        schemas[f"{group}/{version['name']}"] = schema
    return kind, schemas


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    kind, schemas = load_crd(sys.argv[1])
    failures = 0
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        seen = 0
        for n, doc in enumerate(docs):
            if doc.get("kind") != kind:
                continue
            seen += 1
            where = f"{path}: document {n} ({kind} {doc.get('metadata', {}).get('name')})"
            schema = schemas.get(doc.get("apiVersion"))
            if schema is None:
                print(f"{where}: apiVersion {doc.get('apiVersion')} is not one of {sorted(schemas)}")
                failures += 1
                continue
            validator = jsonschema.Draft7Validator(schema)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                field = ".".join(str(p) for p in err.absolute_path) or "(root)"
                print(f"{where}: {field}: {err.message}")
                failures += 1
        if seen == 0:
            print(f"{path}: no {kind} document")
            failures += 1
        elif failures == 0:
            print(f"{path}: {seen} {kind} document(s) valid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
