"""Validation of the request fields that shape the system and developer messages: tools, tool_choice,
reasoning effort. Each error names the offending field the way OpenAI does (`tools[0].function.name`)."""

from __future__ import annotations

import re
from typing import Any

from openai_harmony import ReasoningEffort, ToolDescription

from osserve.harmony.errors import InvalidRequest

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
REASONING_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}
TOOL_CHOICE_MODES = ("auto", "none", "required")


def parse_chat_tools(tools: Any) -> list[ToolDescription]:
    """Chat Completions tools: `[{"type": "function", "function": {name, description, parameters}}]`."""
    out: list[ToolDescription] = []
    for i, tool in enumerate(_as_list(tools, "tools")):
        where = f"tools[{i}]"
        _check_function_type(tool, where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(
                f"{where}.function must be an object with name and parameters", f"{where}.function"
            )
        out.append(_tool(fn, f"{where}.function", out))
    return out


def parse_responses_tools(tools: Any) -> list[ToolDescription]:
    """Responses API tools: `[{"type": "function", name, description, parameters}]` (functions only)."""
    out: list[ToolDescription] = []
    for i, tool in enumerate(_as_list(tools, "tools")):
        where = f"tools[{i}]"
        _check_function_type(tool, where)
        out.append(_tool(tool, where, out))
    return out


def tools_to_render(tools: list[ToolDescription], tool_choice: Any) -> list[ToolDescription]:
    """The tools the prompt should show for this `tool_choice`.

    "auto" / "required" / a named function keep all tools (osserve.structured enforces the call to the
    required / named ones); "none" shows none.
    """
    if tool_choice is None or tool_choice in ("auto", "required"):
        return tools
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if not any(t.name == name for t in tools):
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not among the request's tools "
                f"{[t.name for t in tools]}",
                "tool_choice",
            )
        return tools
    raise InvalidRequest(
        f"tool_choice must be one of {list(TOOL_CHOICE_MODES)} or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
        "tool_choice",
    )


def parse_reasoning_effort(effort: Any, param: str = "reasoning_effort") -> ReasoningEffort:
    """ "low" | "medium" | "high" (any case); None means medium, gpt-oss's default."""
    if effort is None:
        return ReasoningEffort.MEDIUM
    if isinstance(effort, str) and effort.lower() in REASONING_EFFORTS:
        return REASONING_EFFORTS[effort.lower()]
    raise InvalidRequest(f"{param} must be one of {list(REASONING_EFFORTS)}, got {effort!r}", param)


def _as_list(value: Any, param: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{param} must be a list, got {type(value).__name__}", param)
    return value


def _check_function_type(tool: Any, where: str) -> None:
    if not isinstance(tool, dict):
        raise InvalidRequest(f"{where} must be an object, got {type(tool).__name__}", where)
    if tool.get("type", "function") != "function":
        raise InvalidRequest(
            f"{where}.type {tool.get('type')!r} is not supported; only 'function' tools are", f"{where}.type"
        )


def _tool(fn: dict[str, Any], where: str, earlier: list[ToolDescription]) -> ToolDescription:
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise InvalidRequest(
            f"{where}.name must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-', got {name!r}",
            f"{where}.name",
        )
    if any(t.name == name for t in earlier):
        raise InvalidRequest(f"{where}.name {name!r} is defined twice", f"{where}.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"{where}.description must be a string", f"{where}.description")
    return ToolDescription.new(
        name, description or "", _parameters(fn.get("parameters"), f"{where}.parameters")
    )


def _parameters(schema: Any, param: str) -> dict[str, Any] | None:
    # OpenAI: omitted parameters mean a function without arguments; {} is read the same way.
    if schema is None or schema == {}:
        return None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param)
    if schema.get("type", "object") != "object":
        raise InvalidRequest(
            f'{param} must describe an object (type "object"), got type {schema["type"]!r}', param
        )
    props = schema.get("properties")
    if props is not None and not (
        isinstance(props, dict) and all(isinstance(v, dict) for v in props.values())
    ):
        raise InvalidRequest(
            f"{param}.properties must map each property name to a schema object", f"{param}.properties"
        )
    return schema
