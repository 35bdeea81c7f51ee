"""Chat / Responses requests -> Harmony prompts, checked against openai-harmony's own rendering."""

from __future__ import annotations

import copy
import datetime

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from osserve.harmony.encoding import get_encoding
from osserve.harmony.errors import InvalidRequest
from osserve.harmony.formats import ResponseFormat
from osserve.harmony.render import PromptOptions, render_chat, render_responses

DATE = "2025-06-28"
OPTS = PromptOptions(current_date=DATE)
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["location"],
}
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Gets the weather", "parameters": WEATHER_PARAMS},
    }
]
RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Gets the weather",
        "parameters": WEATHER_PARAMS,
    }
]
ARGS = '{"location": "Paris"}'
CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather tool.",
        "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21}'},
]


@pytest.fixture(scope="module")
def enc():
    return get_encoding()


def system(effort=ReasoningEffort.MEDIUM):
    return Message.from_role_and_content(
        Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(DATE)
    )


def developer(instructions=None, tools=True):
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(
            [ToolDescription.new("get_weather", "Gets the weather", WEATHER_PARAMS)]
        )
    return Message.from_role_and_content(Role.DEVELOPER, content)


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def tool_call(args=ARGS):
    return (
        assistant(args, "commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )


def tool_result(text):
    author = Author.new(Role.TOOL, "functions.get_weather")
    return (
        Message.from_author_and_content(author, text).with_recipient("assistant").with_channel("commentary")
    )


def harmony(enc, messages):
    return enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def test_chat_with_tool_call_equals_openai_harmony(enc):
    expected = harmony(
        enc,
        [
            system(),
            developer("Be terse.\n\nAnswer in French."),
            user("Weather in Paris?"),
            assistant("Need the weather tool.", "analysis"),
            tool_call(),
            tool_result('{"temp_c": 21}'),
        ],
    )
    got = render_chat(CHAT, CHAT_TOOLS, options=OPTS, encoding=enc)
    assert got == expected
    text = enc.decode(got)
    assert "<|channel|>commentary <|constrain|>json<|message|>" + ARGS + "<|call|>" in text
    assert text.endswith(
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"temp_c": 21}<|end|><|start|>assistant'
    )


def test_reasoning_effort_and_date_in_system_message(enc):
    msgs = [{"role": "user", "content": "hi"}]
    for effort in ("low", "high", "HIGH"):
        text = enc.decode(render_chat(msgs, reasoning_effort=effort, options=OPTS, encoding=enc))
        assert f"Reasoning: {effort.lower()}" in text
    text = enc.decode(render_chat(msgs, encoding=enc))
    assert "Reasoning: medium" in text and f"Current date: {datetime.date.today().isoformat()}" in text
    assert "<|start|>developer" not in text  # nothing to say: no developer message
    assert render_chat(msgs, reasoning_effort="low", options=OPTS, encoding=enc) == harmony(
        enc, [system(ReasoningEffort.LOW), user("hi")]
    )


def test_tool_choice_none_renders_no_tools(enc):
    got = render_chat(CHAT, CHAT_TOOLS, tool_choice="none", options=OPTS, encoding=enc)
    expected = harmony(
        enc,
        [
            system(),
            developer("Be terse.\n\nAnswer in French.", tools=False),
            user("Weather in Paris?"),
            assistant("Need the weather tool.", "analysis"),
            tool_call(),
            tool_result('{"temp_c": 21}'),
        ],
    )
    assert got == expected
    assert "namespace functions" not in enc.decode(got)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert render_chat(CHAT, CHAT_TOOLS, tool_choice=named, options=OPTS, encoding=enc) == render_chat(
        CHAT, CHAT_TOOLS, options=OPTS, encoding=enc
    )


def test_reasoning_of_finished_turns_is_dropped(enc):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning": "Greet back."},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Hello again!", "reasoning_content": "Greet again."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    expected = harmony(
        enc,
        [
            system(),
            user("Hi"),
            assistant("Hello!", "final"),
            user("And again?"),
            assistant("Hello again!", "final"),
            user("Weather in Paris?"),
        ],
    )
    assert render_chat(msgs, options=OPTS, encoding=enc) == expected
    # A turn still in progress (reasoning + tool call awaiting its result) keeps its reasoning.
    msgs = msgs[:4] + CHAT[2:]
    expected = harmony(
        enc,
        [
            system(),
            developer(),
            user("Hi"),
            assistant("Hello!", "final"),
            user("And again?"),
            assistant("Hello again!", "final"),
            user("Weather in Paris?"),
            assistant("Need the weather tool.", "analysis"),
            tool_call(),
            tool_result('{"temp_c": 21}'),
        ],
    )
    assert render_chat(msgs, CHAT_TOOLS, options=OPTS, encoding=enc) == expected


def test_content_beside_tool_calls_is_a_preamble(enc):
    msgs = copy.deepcopy(CHAT[2:])
    msgs[1]["content"] = "Let me check."
    expected = harmony(
        enc,
        [
            system(),
            developer(),
            user("Weather in Paris?"),
            assistant("Need the weather tool.", "analysis"),
            assistant("Let me check.", "commentary"),
            tool_call(),
            tool_result('{"temp_c": 21}'),
        ],
    )
    assert render_chat(msgs, CHAT_TOOLS, options=OPTS, encoding=enc) == expected


def test_responses_input_equals_chat(enc):
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Need the weather tool."}],
        },
        {"type": "function_call", "call_id": "call_abc", "name": "get_weather", "arguments": ARGS},
        {"type": "function_call_output", "call_id": "call_abc", "output": '{"temp_c": 21}'},
    ]
    got = render_responses(
        items,
        instructions="Be terse.",
        tools=RESPONSES_TOOLS,
        reasoning={"effort": "high"},
        options=OPTS,
        encoding=enc,
    )
    assert got == render_chat(CHAT, CHAT_TOOLS, reasoning_effort="high", options=OPTS, encoding=enc)
    assert render_responses("Hi", encoding=enc, options=OPTS) == render_chat(
        [{"role": "user", "content": "Hi"}], encoding=enc, options=OPTS
    )


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": CHAT_TOOLS + [{"type": "code_interpreter"}]}, "tools[1].type"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": CHAT_TOOLS},
            "tool_choice",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_invalid_request_fields_name_their_param(kwargs, param):
    with pytest.raises(InvalidRequest) as err:
        render_chat([{"role": "user", "content": "hi"}], **kwargs)
    assert err.value.param == param and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            CHAT[:4] + [{"role": "tool", "tool_call_id": "call_zzz", "content": "{}"}],
            "messages[4].tool_call_id",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], "messages[1].role"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        ([{"role": "user"}], "messages[0].content"),
        ([], "messages"),
    ],
)
def test_invalid_messages_name_their_param(messages, param):
    with pytest.raises(InvalidRequest) as err:
        render_chat(messages, CHAT_TOOLS)
    assert err.value.param == param


@pytest.mark.parametrize(
    ("items", "tools", "param"),
    [
        ([{"type": "function_call_output", "call_id": "call_x", "output": "1"}], None, "input[0].call_id"),
        ([{"type": "web_search_call"}], None, "input[0].type"),
        ("hi", [{"type": "function", "name": "x" * 65}], "tools[0].name"),
    ],
)
def test_invalid_responses_input_names_its_param(items, tools, param):
    with pytest.raises(InvalidRequest) as err:
        render_responses(items, tools=tools)
    assert err.value.param == param


SHOPPING = {
    "properties": {
        "items": {"type": "array", "description": "entries on the shopping list", "items": {"type": "string"}}
    },
    "type": "object",
}


@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("description", ["A shopping list", None])
def test_response_format_section_as_the_spec_writes_it(enc, with_tools, description):
    """The spec's "Structured output" developer message: `# Response Formats`, `## {name}`, an optional
    `// {description}` line and the schema, after instructions and tools; everything else exactly as
    openai-harmony renders it (the system message keeps its tools line)."""
    fmt = ResponseFormat("shopping_list", SHOPPING, description)
    messages = [{"role": "system", "content": "You are a helpful shopping assistant"}, CHAT[2]]
    tools = CHAT_TOOLS if with_tools else None
    got = render_chat(messages, tools, options=OPTS, encoding=enc, response_format=fmt)
    plain = harmony(
        enc,
        [system(), developer("You are a helpful shopping assistant", with_tools), user("Weather in Paris?")],
    )
    end = plain.index(enc.encode("<|end|>", allowed_special="all")[0])
    assert got[: end + 1] == plain[: end + 1], "the system message is openai-harmony's"
    dev_text = enc.decode(plain[end + 1 :]).split("<|message|>", 1)[1].split("<|end|>", 1)[0]
    section = "# Response Formats\n\n## shopping_list\n\n"
    section += f"// {description}\n" if description else ""
    section += (
        '{"properties":{"items":{"type":"array","description":"entries on the shopping list",'
        '"items":{"type":"string"}}},"type":"object"}'
    )
    expected = enc.encode(
        f"<|start|>developer<|message|>{dev_text}\n\n{section}<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant",
        allowed_special="all",
    )
    assert got[end + 1 :] == expected
    # The Responses API renders the same from text.format.
    items = [{"role": "user", "content": "Weather in Paris?"}]
    tools_r = RESPONSES_TOOLS if with_tools else None
    assert (
        render_responses(
            items,
            "You are a helpful shopping assistant",
            tools_r,
            options=OPTS,
            encoding=enc,
            text_format=fmt,
        )
        == got
    )


def test_response_format_without_instructions_or_schema(enc):
    msgs = [{"role": "user", "content": "hi"}]
    got = enc.decode(
        render_chat(msgs, options=OPTS, encoding=enc, response_format=ResponseFormat("r", {"type": "object"}))
    )
    assert '<|start|>developer<|message|># Response Formats\n\n## r\n\n{"type":"object"}<|end|>' in got
    # json_object has no schema to show: the prompt is the plain one.
    plain = render_chat(msgs, options=OPTS, encoding=enc)
    assert (
        render_chat(msgs, options=OPTS, encoding=enc, response_format=ResponseFormat("json_object", None))
        == plain
    )


def test_long_texts_render_as_openai_harmony_does(enc):
    """Message texts and instructions are encoded apart from openai-harmony's frames: same tokens."""
    words = "Weather in Paris? It's 21°C; 3 days/week. Naïve café\nNew line, then   spaces.\n"
    long = words * 300
    messages = [{"role": "system", "content": long}, *CHAT[1:3], {"role": "user", "content": long}]
    expected = harmony(
        enc,
        [
            system(),
            developer(long + "\n\nAnswer in French."),
            user("Weather in Paris?"),
            user(long),
        ],
    )
    assert render_chat(messages, CHAT_TOOLS, options=OPTS, encoding=enc, stop_after=10**9) == expected


def test_a_million_characters_of_one_letter_render_fast_and_stop_early(enc):
    """openai-harmony's renderer panics on this (a pyo3 PanicException) and is quadratic below that."""
    import time

    messages = [{"role": "user", "content": "a" * 1_000_000}]
    t0 = time.perf_counter()
    ids = render_chat(messages, options=OPTS, encoding=enc, stop_after=4096)
    assert 4096 < len(ids) < 8192 and time.perf_counter() - t0 < 2.0
    full = render_chat(messages, options=OPTS, encoding=enc)
    assert len(full) > 125_000 and full[: len(ids) - 300] == ids[: len(ids) - 300]
