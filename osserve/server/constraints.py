"""A request's response format and tool_choice -> the grammar its output must follow (osserve.structured),
shared by Chat Completions and the Responses API. Schemas are compiled off the event loop."""

from __future__ import annotations

from typing import Any

import anyio
from openai_harmony import ToolDescription

from osserve.harmony.formats import ResponseFormat, forced_tool_names
from osserve.harmony.tools import tools_to_render
from osserve.server.openai_errors import from_value_error
from osserve.structured import StructuredOutput, build_structured


async def request_constraint(
    response_format: ResponseFormat | None,
    tools: list[ToolDescription],
    tool_choice: Any,
    max_tokens: int | None,
    tools_param: str,
) -> StructuredOutput | None:
    """The request's StructuredOutput, or None when nothing is enforced (plain text, tool_choice "auto"
    without a response format). Raises APIError 400 naming the field that cannot be enforced."""
    try:
        offered = tools_to_render(tools, tool_choice)
        call_names = forced_tool_names(tools, tool_choice)
        if response_format is None and call_names is None:
            return None
        return await anyio.to_thread.run_sync(
            build_structured, response_format, offered, call_names, max_tokens, tools_param
        )
    except ValueError as e:
        raise from_value_error(e) from None
