"""Copy the response schemas the tests validate against out of an OpenAPI description.

The tests never read ../shared; they read the JSON this writes. Rerun when the spec changes:

    python tests/data/extract_schemas.py SPEC.yaml OUT.json Name [Name ...]
"""

from __future__ import annotations

import json
import sys

import yaml


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def extract(spec: dict, roots: list[str]) -> dict:
    schemas = spec["components"]["schemas"]
    keep: dict = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(found - keep.keys())
    return {"openapi": spec["openapi"], "components": {"schemas": dict(sorted(keep.items()))}}


if __name__ == "__main__":
    spec_path, out_path, *names = sys.argv[1:]
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    with open(out_path, "w") as f:
        json.dump(extract(spec, names), f, indent=1, sort_keys=True)
