"""Generate the `config` part of the Helm chart's values.schema.json from balancer.config.

The chart renders its `config` value into balancer's configuration file, so its schema is the
file's schema: one object per section of ``Settings``, one property per dataclass field, typed
from the annotation (enums become ``enum``, tuples arrays, ``X | None`` nullable), described by
the field's attribute docstring, and ``additionalProperties: false`` everywhere, as
``balancer.config`` rejects unknown sections and keys. Ranges and cross-field rules stay in
``balancer.config.validate`` (the pod fails at start with a message naming the key).

    .venv/bin/python scripts/chart_schema.py           # rewrite helm/balancer/values.schema.json
    .venv/bin/python scripts/chart_schema.py --check   # exit 1 if it is out of date

A test runs the check, so a change of the configuration's shape fails until the schema is
regenerated.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import inspect
import itertools
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer import config  # noqa: E402

SCHEMA = ROOT / "helm" / "balancer" / "values.schema.json"

# Fields without a default that balancer.config nonetheless fills in when they are left out.
OPTIONAL = {("PoolSettings", "name"), ("PoolSettings", "models")}


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of one field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(typing.get_args(annotation))
        schemas = [type_schema(a) for a in members]
        if all(set(s) == {"type"} for s in schemas):
            kinds = [s["type"] for s in schemas] + (["null"] if nullable else [])
            return {"type": kinds if len(kinds) > 1 else kinds[0]}
        if nullable:
            schemas.append({"type": "null"})
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if origin in (tuple, list, frozenset, set):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        schema: dict[str, Any] = {"type": "array"}
        if len(args) == 1:
            schema["items"] = type_schema(args[0])
        return schema
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return {"type": "string", "enum": [m.value for m in annotation]}
        if dataclasses.is_dataclass(annotation):
            return object_schema(annotation)
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        for python_type, json_type in simple.items():
            if annotation is python_type:
                return {"type": json_type}
    raise TypeError(f"no JSON schema for {annotation!r}: teach scripts/chart_schema.py")


def object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, vars(config))
    docs = attribute_docs(cls)
    properties = {}
    required = []
    for f in dataclasses.fields(cls):
        schema = type_schema(hints[f.name])
        if f.name in docs:
            schema = {"description": docs[f.name], **schema}
        properties[f.name] = schema
        no_default = (f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
        if no_default and (cls.__name__, f.name) not in OPTIONAL:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        schema["description"] = " ".join(cls.__doc__.split())
    if required:
        schema["required"] = required
    schema["properties"] = properties
    return schema


def _models_schema(schema: dict[str, Any]) -> None:
    """A pool's ``models`` may also be one string (balancer.config accepts it)."""
    pool = schema["properties"]["pools"]["items"]
    models = pool["properties"]["models"]
    models["type"] = ["array", "string"]


def _backends_schema(schema: dict[str, Any]) -> None:
    """A route's backends and fallbacks may also be bare pool names."""
    route = schema["properties"]["routes"]["items"]
    for key in ("backends", "fallbacks"):
        items = copy.deepcopy(route["properties"][key]["items"])
        if key == "fallbacks":  # they take no share of first choices
            del items["properties"]["weight"]
        route["properties"][key]["items"] = {"anyOf": [{"type": "string"}, items]}


def _endpoints_schema(schema: dict[str, Any]) -> None:
    """A pool's ``endpoints`` are URLs or ``{url, zone}`` mappings; the zones they give are
    kept in ``PoolSettings.zones``, which is no key of the file."""
    pool = schema["properties"]["pools"]["items"]
    del pool["properties"]["zones"]
    endpoints = pool["properties"]["endpoints"]
    endpoints["items"] = {"anyOf": [
        {"type": "string"},
        {"type": "object", "additionalProperties": False, "required": ["url"],
         "properties": {"url": {"type": "string"},
                        "zone": {"description": "The endpoint's zone (routing.zone, "
                                                "routing.prefer_zone).",
                                 "type": "string"}}},
    ]}


def config_schema() -> dict[str, Any]:
    schema = object_schema(config.Settings)
    schema["description"] = ("balancer's configuration file (README, \"Configuration "
                             "reference\"), rendered into the ConfigMap.")
    _models_schema(schema)
    _backends_schema(schema)
    _endpoints_schema(schema)
    return schema


def render(current: dict[str, Any]) -> str:
    updated = dict(current)
    updated["properties"] = {**current["properties"], "config": config_schema()}
    return json.dumps(updated, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = SCHEMA.read_text(encoding="utf-8")
    expected = render(json.loads(text))
    if "--check" in argv:
        if text != expected:
            print(f"{SCHEMA.relative_to(ROOT)} is out of date: run "
                  "`.venv/bin/python scripts/chart_schema.py`", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
