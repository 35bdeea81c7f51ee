"""A request's output constraint as a grammar over the whole Harmony completion (llguidance's Lark dialect).

The completion starts after the prompt's `<|start|>assistant`. The analysis message is free text; the
message after it is the constrained one:

    <|channel|>analysis<|message|>{any text}<|end|><|start|>assistant
    then  <|channel|>final<|message|>{JSON matching the schema}<|return|>
    or    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{arguments}<|call|>
          (or ` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>`, openai-harmony's
          placement of the recipient; the space before <|constrain|> is optional)

Special tokens are grammar tokens (`<|end|>`), never the text that spells them, and free text never
contains one. When the request sets max_tokens, the analysis may take all but `answer_reserve(max_tokens)`
of them: the grammar then closes it, so a long reasoning still leaves room for the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
from openai_harmony import ToolDescription

from osserve.harmony.errors import InvalidRequest
from osserve.harmony.formats import ResponseFormat
from osserve.harmony.tools import TOOL_NAME_RE

StructuredKind = Literal["json_schema", "json_object", "tool_call"]
# JSON layout inside the constrained message: one line, `{"a":1,"b":2}` or `{"a": 1, "b": 2}` (gpt-oss's
# tool-call arguments in the Harmony spec are compact). Free whitespace would let a weak model pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
_ERROR_PREFIX = re.compile(r"^at \d+\(\d+\): ")
_SOURCE_LINE = re.compile(r"\n\s*\d+ \| ")


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must be, as plain data (it travels to an engine process or a remote
    worker in SamplingParams): the llguidance Lark `grammar` and, for logs and errors, its `kind`."""

    kind: StructuredKind
    grammar: str


def answer_reserve(max_tokens: int) -> int:
    """Tokens kept for the answer: half of a small budget, a quarter of a large one, 256 in between."""
    return min(max_tokens // 2, max(256, max_tokens // 4))


def build_structured(
    response_format: ResponseFormat | None,
    tools: list[ToolDescription],
    call_names: list[str] | None,
    max_tokens: int | None,
    tools_param: str = "tools[{}].function.parameters",
) -> StructuredOutput | None:
    """The constraint of a request, or None when nothing is enforced.

    `call_names` (harmony.formats.forced_tool_names: tool_choice "required" or a named function) means
    the answer must be a call to one of those `tools`. Otherwise a `response_format` makes the answer
    JSON, or a call to one of `tools` (those the prompt offers: none for tool_choice "none"). Raises
    InvalidRequest naming the schema's field (`tools_param` formatted with the tool's index) when a schema
    cannot be enforced.
    """
    if call_names is not None:
        indexed = [(i, t) for i, t in enumerate(tools) if t.name in call_names]
        kind: StructuredKind = "tool_call"
        answers = []
    elif response_format is not None:
        indexed = list(enumerate(tools))
        kind = "json_schema" if response_format.schema is not None else "json_object"
        schema = response_format.schema if response_format.schema is not None else {"type": "object"}
        check_schema(schema, response_format.param)
        answers = [
            'final: <|channel|> "final" <|message|> final_json <|return|>\n'
            f"final_json: %json {_json_text(schema)}\n"
        ]
    else:
        return None
    for i, tool in indexed:
        if tool.parameters:
            check_schema(tool.parameters, tools_param.format(i))
        answers.append(_tool_call(i, tool))
    names = [a.split(":", 1)[0] for a in answers]
    budget = f"[max_tokens={max_tokens - answer_reserve(max_tokens)}]" if max_tokens else ""
    grammar = (
        "%llguidance {}\n"
        "start: analysis answer\n"
        'analysis: <|channel|> "analysis" <|message|> reasoning <|end|> <|start|> "assistant"\n'
        f"reasoning{budget}: /(?s:.*)/\n"
        f"answer: {' | '.join(names)}\n" + "".join(answers)
    )
    _check(grammar, response_format.param if response_format is not None else "tool_choice")
    return StructuredOutput(kind, grammar)


def _tool_call(index: int, tool: ToolDescription) -> str:
    if not TOOL_NAME_RE.match(tool.name):  # checked by harmony.tools; the grammar literal relies on it
        raise InvalidRequest(f"tool name {tool.name!r} cannot be constrained", "tools")
    recipient = f"to=functions.{tool.name}"
    schema = tool.parameters if tool.parameters else {"type": "object", "additionalProperties": False}
    return (
        f'call_{index}: call_{index}_header " "? <|constrain|> "json" <|message|> call_{index}_args <|call|>\n'
        f'call_{index}_header: " {recipient}" <|channel|> "commentary" '
        f'| <|channel|> "commentary {recipient}"\n'
        f"call_{index}_args: %json {_json_text(schema)}\n"
    )


def _json_text(schema: dict[str, Any]) -> str:
    """The schema with our JSON layout options (a client's own `x-guidance` is replaced)."""
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Raise InvalidRequest naming `param` if llguidance cannot enforce `schema` (unsupported keywords or
    formats, lookaround in patterns, unsatisfiable constraints, bad $refs)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": JSON_OPTIONS})
    except ValueError as e:
        raise InvalidRequest(f"{param} is not valid JSON: {e}", param) from None
    _check(grammar, param)


def _check(grammar: str, param: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        # NOTE: llguidance's message may start with the grammar position ("at 2(4): ") and end with the
        # grammar's source ("   1 | start: ..."); the text between names the problem.
        text = _SOURCE_LINE.split(_ERROR_PREFIX.sub("", error.strip()))[0]
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        raise InvalidRequest(f"{param} cannot be enforced: {text}", param)
