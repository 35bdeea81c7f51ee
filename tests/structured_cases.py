"""The schema suite of the structured-output checks: 32 JSON schemas and 4 tools, each bounded (strings
with maxLength / pattern / format, arrays with maxItems, numbers with ranges) so that a model that never
chooses to stop still finishes under the grammar. Used by tests/test_structured_server.py (CPU, tiny
model) and scripts/structured_check.py (a live server, e.g. gpt-oss on the GPU)."""

from __future__ import annotations

import jsonschema


def obj(properties, required=None):
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = {
    "string": obj({"name": {"type": "string", "maxLength": 6}}),
    "integer range": obj({"n": {"type": "integer", "minimum": -10, "maximum": 10}}),
    "number range": obj({"x": {"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.5}}),
    "negative numbers": obj({"t": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25}}),
    "exclusive bounds": obj({"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    "multiple of": obj({"even": {"type": "integer", "minimum": 0, "maximum": 20, "multipleOf": 2}}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "mixed enum": obj({"e": {"enum": [1, "two", True, None]}}),
    "unicode enum": obj({"greeting": {"enum": ["héllo", "こんにちは", "🦩"]}}),
    "const": obj({"version": {"const": 2}, "kind": {"const": "report"}}),
    "boolean and null": obj({"flag": {"type": "boolean"}, "nothing": {"type": "null"}}),
    "optional fields": obj(
        {"a": SMALL_INT, "b": {"type": "string", "maxLength": 4}, "c": {"type": "boolean"}}, ["a"]
    ),
    "all optional": obj({"a": SMALL_INT, "b": {"type": "boolean"}}, []),
    "nullable": obj({"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 3}}),
    "string lengths": obj({"s": {"type": "string", "minLength": 2, "maxLength": 5}}),
    "pattern code": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    "pattern zip": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "pattern hex": obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    "format date": obj({"when": {"type": "string", "format": "date"}}),
    "format ipv4": obj({"ip": {"type": "string", "format": "ipv4"}}),
    "array of enums": obj({"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}}),
    "array bounds": obj({"ns": {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 3}}),
    "fixed array": obj(
        {
            "rgb": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 255},
                "minItems": 3,
                "maxItems": 3,
            }
        }
    ),
    "tuple": obj(
        {"pair": {"type": "array", "prefixItems": [SMALL_INT, {"enum": ["a", "b"]}], "items": False}}
    ),
    "array of objects": obj(
        {"points": {"type": "array", "maxItems": 2, "items": obj({"x": SMALL_INT, "y": SMALL_INT})}}
    ),
    "nested object": obj(
        {
            "user": obj(
                {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "role": {"enum": ["admin", "guest"]},
                }
            )
        }
    ),
    "deep nesting": obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    "anyOf": obj({"value": {"anyOf": [SMALL_INT, {"type": "string", "maxLength": 3}]}}),
    "oneOf objects": obj(
        {
            "shape": {
                "oneOf": [
                    obj({"kind": {"const": "circle"}, "r": SMALL_INT}),
                    obj({"kind": {"const": "square"}, "side": SMALL_INT}),
                ]
            }
        }
    ),
    "refs": {
        "$defs": {"pt": obj({"v": {"type": "integer", "minimum": 0, "maximum": 5}})},
        **obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}}),
    },
    "many fields": obj({k: {"type": "boolean"} for k in "abcdefgh"}),
    "top-level array": {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 4},
}
TOOLS = [
    (
        "get_weather",
        obj({"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}}, ["city"]),
    ),
    (
        "add",
        obj(
            {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            }
        ),
    ),
    ("no_args", None),
    (
        "mcp__atlassian__jira_get_issue_transitions_v2",
        obj({"issue": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,3}$"}}),
    ),
]
CHAT_TOOLS = [
    {"type": "function", "function": {"name": n, **({"parameters": p} if p else {})}} for n, p in TOOLS
]
PARAMS = {n: p or {"type": "object", "properties": {}, "additionalProperties": False} for n, p in TOOLS}


def validate(instance, schema) -> None:
    """jsonschema validation, formats (date, ipv4) included."""
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(instance)
