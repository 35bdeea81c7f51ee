"""OpenAI requests -> Harmony prompt token ids.

Chat Completions `messages` and Responses `input` are first flattened into one list of `Turn`s (what was
said, by whom, on which channel, and where in the request it came from, for error messages); one builder
turns that list into an openai-harmony `Conversation`, so both APIs render identically:

    system      identity, knowledge cutoff, current date, reasoning effort, valid channels
    developer   instructions from every system/developer message (joined in order) + `functions` tools
    user        text
    assistant   reasoning -> analysis; text -> final (or a commentary preamble when tool calls follow);
                tool call -> commentary to=functions.NAME <|constrain|>json, ending in <|call|>
    tool        result -> author functions.NAME to=assistant on commentary, NAME found by call id

Past reasoning is dropped from every turn that ended in a final answer (Harmony's rule); reasoning of
the turn still in progress (e.g. analysis + a tool call awaiting its result) is kept.

openai-harmony renders each message's frame (header, channel, recipient, the tools section); the text the
client sent (message text, instructions) is encoded by `encode_ordinary`, which takes linear time and
releases the GIL (openai-harmony's own render holds it, is quadratic on long runs of one character and
panics on very long ones). The tokens are the same: Harmony encodes a message's text on its own.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    RenderOptions,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)

from osserve.harmony.encoding import MESSAGE, START, encode_ordinary, get_encoding
from osserve.harmony.errors import InvalidRequest
from osserve.harmony.formats import ResponseFormat, response_formats_section
from osserve.harmony.tools import (
    parse_chat_tools,
    parse_reasoning_effort,
    parse_responses_tools,
    tools_to_render,
)
from osserve.harmony.turns import Turn, chat_turns, responses_turns


@dataclass(frozen=True)
class PromptOptions:
    """Server-level facts for the system message. `current_date` None means today (YYYY-MM-DD)."""

    model_identity: str | None = SystemContent.model_fields["model_identity"].default
    knowledge_cutoff: str | None = "2024-06"
    current_date: str | None = None


def render_chat(
    messages: Any,
    tools: Any = None,
    tool_choice: Any = None,
    reasoning_effort: Any = None,
    options: PromptOptions | None = None,
    encoding: HarmonyEncoding | None = None,
    response_format: ResponseFormat | None = None,
    stop_after: int | None = None,
) -> list[int]:
    """Prompt token ids for a Chat Completions request (plain dicts), ending in `<|start|>assistant`.

    Raises `InvalidRequest` (with `param`) on a malformed request. `stop_after`: see `render_conversation`.
    """
    conv = chat_conversation(messages, tools, tool_choice, reasoning_effort, options, response_format)
    return render_conversation(conv, encoding, stop_after)


def render_responses(
    input: Any,
    instructions: str | None = None,
    tools: Any = None,
    tool_choice: Any = None,
    reasoning: Any = None,
    options: PromptOptions | None = None,
    encoding: HarmonyEncoding | None = None,
    text_format: ResponseFormat | None = None,
    stop_after: int | None = None,
) -> list[int]:
    """Prompt token ids for a Responses API request: `input` (string or items), `instructions`,
    function `tools`, `tool_choice`, `reasoning` ({"effort": ...}) and a parsed `text.format`."""
    conv = responses_conversation(input, instructions, tools, tool_choice, reasoning, options, text_format)
    return render_conversation(conv, encoding, stop_after)


# Stands in for developer instructions while openai-harmony lays out the developer message around them.
_INSTRUCTIONS_MARK = "\uffffosserve-instructions\uffff"


def render_conversation(
    conv: Conversation, encoding: HarmonyEncoding | None = None, stop_after: int | None = None
) -> list[int]:
    """Render for the assistant's next turn: openai-harmony's `render_conversation_for_completion` with
    `auto_drop_analysis` off (our builder already dropped old reasoning), texts encoded as the module
    docstring says. With `stop_after`, rendering stops once the prompt has more than that many tokens: the
    result is then cut short (its length only says the prompt is longer than `stop_after`)."""
    enc = encoding or get_encoding()
    options = RenderOptions(conversation_has_function_tools=_has_function_tools(conv))
    ids: list[int] = []
    for message in conv.messages:
        budget = None if stop_after is None else stop_after - len(ids)
        ids += _render_message(enc, message, options, budget)
        if stop_after is not None and len(ids) > stop_after:
            return ids
    return [*ids, START, *encode_ordinary(enc, Role.ASSISTANT.value)]


def _render_message(
    enc: HarmonyEncoding, message: Message, options: RenderOptions, stop_after: int | None
) -> list[int]:
    """One message: openai-harmony's frame with the client's text spliced in after `<|message|>`."""
    match message.content:
        case [TextContent(text=text)]:
            frame = enc.render(message.model_copy(update={"content": [TextContent(text="")]}), options)
            return [*frame[:-1], *encode_ordinary(enc, text, stop_after), frame[-1]]
        case [DeveloperContent(instructions=str(text)) as dev] if text:
            marked = dev.model_copy(update={"instructions": _INSTRUCTIONS_MARK})
            frame = enc.render(message.model_copy(update={"content": [marked]}), options)
            body = frame.index(MESSAGE) + 1
            head, _, tail = enc.decode_utf8(frame[body:-1]).partition(_INSTRUCTIONS_MARK)
            return [*frame[:body], *encode_ordinary(enc, head + text + tail, stop_after), frame[-1]]
    return enc.render(message, options)


def _has_function_tools(conv: Conversation) -> bool:
    return any(
        isinstance(c, DeveloperContent)
        and c.tools
        and c.tools.get("functions")
        and c.tools["functions"].tools
        for m in conv.messages
        for c in m.content
    )


def chat_conversation(
    messages: Any,
    tools: Any = None,
    tool_choice: Any = None,
    reasoning_effort: Any = None,
    options: PromptOptions | None = None,
    response_format: ResponseFormat | None = None,
) -> Conversation:
    """The Harmony `Conversation` of a Chat Completions request."""
    tool_list = tools_to_render(parse_chat_tools(tools), tool_choice)
    effort = parse_reasoning_effort(reasoning_effort)
    return build_conversation(chat_turns(messages), tool_list, effort, options, response_format)


def responses_conversation(
    input: Any,
    instructions: str | None = None,
    tools: Any = None,
    tool_choice: Any = None,
    reasoning: Any = None,
    options: PromptOptions | None = None,
    text_format: ResponseFormat | None = None,
) -> Conversation:
    """The Harmony `Conversation` of a Responses API request."""
    tool_list = tools_to_render(parse_responses_tools(tools), tool_choice)
    if reasoning is not None and not isinstance(reasoning, dict):
        raise InvalidRequest('reasoning must be an object like {"effort": "medium"}', "reasoning")
    effort = parse_reasoning_effort((reasoning or {}).get("effort"), "reasoning.effort")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("instructions must be a string", "instructions")
    turns = [Turn("instructions", instructions, "instructions")] if instructions else []
    return build_conversation(turns + responses_turns(input), tool_list, effort, options, text_format)


def build_conversation(
    turns: list[Turn],
    tools: list[ToolDescription],
    effort: ReasoningEffort,
    options: PromptOptions | None = None,
    response_format: ResponseFormat | None = None,
) -> Conversation:
    """Turns + rendered tools + reasoning effort (+ a response format's schema) -> a Harmony `Conversation`
    (no generation prompt)."""
    opts = options or PromptOptions()
    system = (
        SystemContent.new()
        .with_reasoning_effort(effort)
        .with_conversation_start_date(opts.current_date or datetime.date.today().isoformat())
    )
    system.model_identity, system.knowledge_cutoff = opts.model_identity, opts.knowledge_cutoff
    messages = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = [t.text for t in turns if t.kind == "instructions"]
    if instructions or tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools(tools)
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    if response_format is not None and response_format.schema is not None:
        messages = _with_response_format(messages, response_formats_section(response_format), bool(tools))
    body = [t for t in turns if t.kind != "instructions"]
    messages += _drop_finished_reasoning(_body_messages(body))
    return Conversation.from_messages(messages)


def _with_response_format(messages: list[Message], section: str, has_tools: bool) -> list[Message]:
    """The system and developer messages with the spec's `# Response Formats` section last in the developer
    message. NOTE: openai-harmony 0.0.8 cannot render response formats, so both messages become the text
    it renders for them (the system message's "Calls to these tools..." line depends on the developer
    message holding tools), and the section is appended to the developer text."""
    enc = get_encoding()
    options = RenderOptions(conversation_has_function_tools=has_tools)

    def text_of(message: Message) -> str:
        ids = enc.render(message, options)
        return enc.decode_utf8(ids[ids.index(MESSAGE) + 1 : -1])  # between <|message|> and <|end|>

    system = Message.from_role_and_content(Role.SYSTEM, text_of(messages[0]))
    developer = f"{text_of(messages[1])}\n\n{section}" if len(messages) > 1 else section
    return [system, Message.from_role_and_content(Role.DEVELOPER, developer)]


def _body_messages(turns: list[Turn]) -> list[Message]:
    call_names: dict[str, str] = {}
    out = []
    for t in turns:
        if t.kind == "user":
            out.append(Message.from_role_and_content(Role.USER, t.text))
        elif t.kind == "reasoning":
            out.append(Message.from_role_and_content(Role.ASSISTANT, t.text).with_channel("analysis"))
        elif t.kind in ("preamble", "final"):
            channel = "commentary" if t.kind == "preamble" else "final"
            out.append(Message.from_role_and_content(Role.ASSISTANT, t.text).with_channel(channel))
        elif t.kind == "tool_call":
            if t.call_id is not None:
                call_names[t.call_id] = t.name or ""
            out.append(
                Message.from_role_and_content(Role.ASSISTANT, t.text)
                .with_channel("commentary")
                .with_recipient(f"functions.{t.name}")
                .with_content_type("<|constrain|>json")
            )
        else:  # tool_result
            name = call_names.get(t.call_id or "")
            if name is None:
                raise InvalidRequest(
                    f"{t.param} {t.call_id!r} matches no earlier assistant tool call "
                    f"(known ids: {sorted(call_names)})",
                    t.param,
                )
            author = Author.new(Role.TOOL, f"functions.{name}")
            out.append(
                Message.from_author_and_content(author, t.text)
                .with_recipient("assistant")
                .with_channel("commentary")
            )
    return out


def _drop_finished_reasoning(messages: list[Message]) -> list[Message]:
    # Harmony: reasoning of a turn that ended in a final answer is not shown again. Everything after the
    # last final message is the turn in progress, whose reasoning the model must still see.
    finals = [i for i, m in enumerate(messages) if m.channel == "final"]
    if not finals:
        return messages
    return [m for i, m in enumerate(messages) if not (i < finals[-1] and m.channel == "analysis")]
