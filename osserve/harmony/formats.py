"""Response formats (`response_format`, Responses `text.format`) and forced tool calls (`tool_choice`) as
the prompt and the output grammar need them: validated request fields, the developer message's
`# Response Formats` section (Harmony spec, "Structured output"), and the tools a call must go to."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from openai_harmony import ToolDescription

from osserve.harmony.errors import InvalidRequest

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ResponseFormat:
    """A `json_schema` or `json_object` response format. `schema` None means any JSON object; `param` is
    where the schema sits in the request (for errors)."""

    name: str
    schema: dict[str, Any] | None
    description: str | None = None
    param: str = "response_format"


def parse_response_format(value: Any, param: str = "response_format") -> ResponseFormat | None:
    """Chat Completions `response_format`: `{"type": "text"}` (None), `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name", "schema", "description", "strict"}}`."""
    kind = _format_type(value, param)
    if kind is None:
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", None, param=param)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest(
            f'{param}.json_schema must be an object {{"name", "schema", "strict"}}', f"{param}.json_schema"
        )
    return _schema_format(spec, f"{param}.json_schema")


def parse_text_format(value: Any, param: str = "text.format") -> ResponseFormat | None:
    """Responses API `text.format`: `{"type": "text"}` (None), `{"type": "json_object"}` or
    `{"type": "json_schema", "name", "schema", "description", "strict"}`."""
    kind = _format_type(value, param)
    if kind is None:
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", None, param=param)
    return _schema_format(value, param)


def _format_type(value: Any, param: str) -> str | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            f"{param}.type must be one of 'text', 'json_object', 'json_schema'; got {kind!r}", f"{param}.type"
        )
    return None if kind == "text" else kind


def _schema_format(spec: dict[str, Any], param: str) -> ResponseFormat:
    # NOTE: OpenAI requires a name; clients written for other servers often leave it out.
    name = spec.get("name", "response")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequest(
            f"{param}.name must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-', got {name!r}",
            f"{param}.name",
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}.schema must be a JSON Schema object", f"{param}.schema")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"{param}.description must be a string", f"{param}.description")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(f"{param}.strict must be a boolean", f"{param}.strict")
    return ResponseFormat(name, schema, description, f"{param}.schema")


def response_formats_section(fmt: ResponseFormat) -> str:
    """The developer message's section for a schema, as the Harmony spec writes it:
    `# Response Formats\\n\\n## {name}\\n\\n// {description}\\n{schema}` (no description line without one),
    the schema as compact JSON in the client's key order."""
    assert fmt.schema is not None
    description = f"// {fmt.description}\n" if fmt.description else ""
    schema = json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":"))
    return f"# Response Formats\n\n## {fmt.name}\n\n{description}{schema}"


def forced_tool_names(tools: list[ToolDescription], tool_choice: Any) -> list[str] | None:
    """The functions the answer must call: every tool for "required", the named one for a named choice;
    None when no call is forced ("auto", "none", absent). `tool_choice` was validated by tools_to_render."""
    if tool_choice == "required":
        if not tools:
            raise InvalidRequest("tool_choice 'required' needs at least one function in tools", "tool_choice")
        return [t.name for t in tools]
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        return [fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")]
    return None
