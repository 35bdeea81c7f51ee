"""Request bodies of the OpenAI-compatible API, as pydantic models.

Types are strict (a string is not a number) so that a wrong type is a 400 that names the field; integers
may be written 3.0, as JSON Schema allows. Messages, tools and Responses input items are typed by shape;
`osserve.harmony` checks what they mean (tool names, schemas, call ids) and names the offending field
itself. Unknown top-level fields are ignored, as vLLM does, so clients that send extras keep working.

The published schema (GET /openapi.json) refuses what the server refuses wherever JSON Schema can say it
(`_only`: options the server does not support yet; top_logprobs needs logprobs; no empty prompt); the
server's own checks keep their clearer messages. What the schema cannot say (a tool message's call id must
match an earlier call; the prompt must fit the context) is checked by the server alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag, WithJsonSchema

# torch generators take seeds in this range.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20
# Values past this are certain to exceed any context length; the bound keeps arithmetic in machine ints.
MAX_TOKENS_LIMIT = 2**31 - 1

Json = dict[str, Any]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(lo: int, hi: int) -> Any:  # noqa: N802 - a type, read as one
    """A JSON integer in [lo, hi]: 3 or 3.0, never "3" or true. (The explicit JSON schema is needed because
    pydantic cannot express the bounds of a validator-wrapped int in JSON Schema itself.)"""
    return Annotated[
        int,
        BeforeValidator(_integral),
        Strict(),
        Field(ge=lo, le=hi),
        WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi}),
    ]


def _only(schema: dict[str, Any]) -> Any:
    """Publish `schema` for a field whose type accepts more, so that the server can refuse the rest itself
    with a message that says what is supported."""
    return WithJsonSchema(schema)


TokenId = Int(0, 2**31 - 1)  # checked against the vocabulary by the engine
# The same, validated without a Python call per item (a prompt may hold a million ids): 3.0 is no such id,
# so a list with one is validated again as `TokenId`s.
FastTokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
NonEmptyText = Annotated[str, Field(min_length=1)]
Stop = NonEmptyText | list[NonEmptyText]
TOOL_NAME_SCHEMA = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
# "auto" | "none" | "required", or one function by name (Chat's and Responses' forms; it must be a tool).
TOOL_CHOICE_SCHEMA = {
    "anyOf": [
        {"enum": ["auto", "none", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": TOOL_NAME_SCHEMA},
                },
            },
        },
        {
            "type": "object",
            "required": ["type", "name"],
            "properties": {"type": {"const": "function"}, "name": TOOL_NAME_SCHEMA},
        },
        {"type": "null"},
    ]
}
ToolChoice = Annotated[str | Json | None, _only(TOOL_CHOICE_SCHEMA)]
Seed = Int(SEED_MIN, SEED_MAX)
NumTokens = Int(1, MAX_TOKENS_LIMIT)
NumChoices = Int(1, 128)
NumLogprobs = Int(0, MAX_LOGPROBS)
MinTokens = Int(0, MAX_TOKENS_LIMIT)
TopK = Int(-1, MAX_TOKENS_LIMIT)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Open(BaseModel):
    """Nested objects: unknown keys are kept and passed on (Harmony decides what they mean)."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False,
        description="With include_usage: the usage so far in every chunk, also for tokens showing no text.",
    )


# -- chat messages ----------------------------------------------------------------------------------------


class TextPart(_Open):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionDefinition(_Open):
    name: Annotated[str, _only(TOOL_NAME_SCHEMA)]
    description: str | None = None
    parameters: Json | None = None
    strict: bool | None = None


class ChatTool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolCallFunction(_Open):
    name: str
    # A JSON string, as OpenAI sends it; an already-parsed object is accepted too.
    arguments: str | Json | None = None


class ChatToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class SystemMessage(_Open):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    # Earlier reasoning of this turn; both names are accepted since clients differ.
    reasoning_content: str | None = None
    reasoning: str | None = None


class ToolMessage(_Open):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class ResponseFormat(_Open):
    type: Annotated[Literal["text", "json_object", "json_schema"], _only({"const": "text"})] = "text"


# -- Responses API input items ------------------------------------------------------------------------


class InputTextPart(_Open):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputTextPart]


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]


class ReasoningPart(_Open):
    type: Literal["reasoning_text", "summary_text", "text"]
    text: str


class ReasoningItem(_Open):
    type: Literal["reasoning"]
    summary: list[ReasoningPart] = []
    content: list[ReasoningPart] | None = None


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class ResponsesFunctionTool(_Open):
    type: Literal["function"] = "function"
    name: Annotated[str, _only(TOOL_NAME_SCHEMA)]
    description: str | None = None
    parameters: Json | None = None
    strict: bool | None = None


# -- the three generation requests ----------------------------------------------------------------------


class _Sampling(_Strict):
    """Sampling options shared by the three generation endpoints (OpenAI's names plus vLLM's extras)."""

    model: str | None = Field(
        None, description="The served model name (GET /v1/models); omitted: the one model."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras.
    top_k: TopK | None = Field(None, description="0 or -1: off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: MinTokens = 0
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    # JSON Schema for "top_logprobs (a number) needs logprobs: true", as the server checks it.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NumTokens | None = Field(None, description="Older name of max_completion_tokens.")
    max_completion_tokens: NumTokens | None = None
    n: NumChoices = 1
    stop: Stop | None = Field(None, description="Strings that end the answer (content) where they appear.")
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = Field(None, description="Needs logprobs: true.")
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    chat_template_args: Json | None = Field(
        None, description='Harmony options, e.g. {"reasoning_effort": "high"}.'
    )
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_Sampling):
    # A string, a list of strings, a list of token ids or a list of token-id lists; never empty. NOTE: tried
    # in this order, first match wins: a long list of ids costs one fast pass, not one failed pass per form.
    prompt: Annotated[
        NonEmptyText
        | Annotated[list[FastTokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[FastTokenId], Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
        Field(union_mode="left_to_right"),
        _only(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                    {"type": "array", "minItems": 1, "items": TOKEN_ID_SCHEMA},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "array", "minItems": 1, "items": TOKEN_ID_SCHEMA},
                    },
                ]
            }
        ),
    ]
    max_tokens: NumTokens | None = 16
    n: NumChoices = 1
    stop: Stop | None = None
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: NumChoices | None = Field(None, description="Only best_of = n.")
    suffix: Annotated[str | None, _only({"anyOf": [{"type": "null"}, {"const": ""}]})] = Field(
        None, description="Not supported."
    )


class ReasoningOptions(_Open):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesTextFormat(_Open):
    type: Annotated[Literal["text", "json_object", "json_schema"], _only({"const": "text"})] = "text"


class ResponsesText(_Open):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(_Sampling):
    # A string (one user message) or a list of items.
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: NumTokens | None = None
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningOptions | None = None
    text: ResponsesText | None = None
    top_logprobs: NumLogprobs | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    background: Annotated[bool | None, _only({"anyOf": [{"type": "null"}, {"const": False}]})] = Field(
        None, description="Not supported (nothing is stored)."
    )
    previous_response_id: Annotated[str | None, _only({"type": "null"})] = Field(
        None, description="Not supported (nothing is stored): send the whole conversation."
    )
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server returns has this shape, as OpenAI's API does."""

    error: ErrorDetail
