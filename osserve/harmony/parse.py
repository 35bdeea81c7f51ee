"""The model's output tokens -> OpenAI-facing reasoning / content / tool-call deltas, streaming.

Built on openai-harmony's `StreamableParser` for the assistant role. Mapping of Harmony messages:

    analysis channel                       -> reasoning
    final channel, commentary (no recipient) -> content (a commentary message is a preamble)
    recipient functions.NAME (any channel) -> a tool call NAME; its message text is the arguments
    any other recipient (built-in tools)   -> reasoning: we expose no built-in tools, and such text is
                                              work product, not an answer

Malformed output never raises. On the first error openai-harmony reports, the parser records it in
`error` and from then on streams every further token's text as content (specials skipped), from the
offending token on, so a random-weight model still produces visible text. Header tokens that were
buffered when the error struck are lost. An unfinished UTF-8 character at the very end is dropped, the
same way openai-harmony drops it, so streamed and non-streamed results agree.

Text that never became Harmony is not swallowed: a header without any Harmony structure (no `<|start|>`,
`<|channel|>` or `<|constrain|>`, not `to=...`) longer than MAX_HEADER_TOKENS, a structured one longer
than MAX_STRUCTURED_HEADER_TOKENS, or (at `end()`) such unstructured text when the output stops, comes
out as content with the error recorded. A structured header cut off by the length limit shows nothing.
`<|endoftext|>` is an end of output, never text.

Cost per token is constant: openai-harmony's `StreamableParser.state` serialises the whole current
message, so it is read only after special tokens, the only ones that can change it.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Literal

from openai_harmony import Role, StreamableParser, StreamState

from osserve.harmony.encoding import (
    CHANNEL,
    CONSTRAIN,
    ENDOFTEXT,
    NUM_TEXT_TOKENS,
    START,
    IncrementalDetokenizer,
    Tokenizer,
    get_tokenizer,
)

DeltaKind = Literal["reasoning", "content", "tool_call"]
# A header with no Harmony structure yet (a random-weight model's plain text) is given up on after this
# many tokens and shown as content rather than swallowed.
MAX_HEADER_TOKENS = 24
# A structured header (`<|end|><|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json
# <|message|>`) holds a role, a recipient of up to 64 characters (tools.py's name rule; a token per character
# at worst), a channel and a content type: well under this.
MAX_STRUCTURED_HEADER_TOKENS = 128
_HEADER_MARKERS = frozenset((START, CHANNEL, CONSTRAIN))
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """`call_` + 24 random alphanumerics, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class Delta:
    """A piece of output. For `tool_call`, `text` is argument text; the first delta of each call also
    carries `tool_call_id` and `tool_name` (its text may be empty). `message_index` counts Harmony
    messages in this output (the Responses API makes one output item per message)."""

    kind: DeltaKind
    text: str
    message_index: int
    tool_call_index: int | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ParsedMessage:
    """The whole output. `reasoning` / `content` are None when the model produced none of that kind."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    num_reasoning_tokens: int = 0  # tokens of analysis-channel text, for usage.reasoning_tokens
    error: str | None = None  # openai-harmony's complaint about malformed output, if any


class OutputParser:
    """Feed one request's sampled token ids in order; get deltas back. Stop tokens may or may not be fed."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer or get_tokenizer()
        self._parser = StreamableParser(self.tokenizer.encoding, Role.ASSISTANT)
        self._fallback: IncrementalDetokenizer | None = None
        self._kind: DeltaKind | None = None  # kind of the message whose text is streaming now
        self._message_index = -1
        self._texts: dict[str, list[str]] = {}
        self.tool_calls: list[ToolCall] = []
        self.num_reasoning_tokens = 0
        self.num_tokens = 0  # tokens fed so far
        self.error: str | None = None
        self._header_ids: list[int] = []  # tokens fed since the last message body ended
        self._structured = False  # the header in `_header_ids` has shown Harmony structure
        self._in_content = False  # the parser's state is CONTENT (read after special tokens only)

    def process(self, token_id: int) -> list[Delta]:
        """Feed one token; return the deltas it completes (often none)."""
        self.num_tokens += 1
        if token_id == ENDOFTEXT:
            return []  # the model's end of text: it ends generation, it is never text
        if self._fallback is not None:
            return self._emit("content", self._fallback.add(token_id))
        special = not 0 <= token_id < NUM_TEXT_TOKENS
        try:
            self._parser.process(token_id)
            if special:
                self._in_content = self._parser.state == StreamState.CONTENT
        except BaseException as exc:  # noqa: BLE001 - pyo3 panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return self._fail(token_id, exc)
        in_content = self._in_content
        deltas: list[Delta] = []
        if not in_content:
            self._header_ids.append(token_id)
            self._structured = self._structured or token_id in _HEADER_MARKERS
            if len(self._header_ids) > MAX_HEADER_TOKENS and self._header_too_long():
                ids, self._header_ids = self._header_ids, []
                return self._fail_many(ids, f"no message body after {len(ids) - 1} header tokens")
        elif self._header_ids:
            self._header_ids.clear()
            self._structured = False
        if in_content and self._kind is None:
            deltas += self._begin_message()
        elif in_content:
            if self._kind == "reasoning":
                self.num_reasoning_tokens += 1
            deltas += self._emit(self._kind, self._parser.last_content_delta or "")
        elif self._kind is not None:
            self._kind = None
        return deltas

    def process_many(self, token_ids: list[int]) -> list[Delta]:
        """Feed several tokens; adjacent deltas of the same message are merged (one stream chunk each)."""
        return coalesce([d for t in token_ids for d in self.process(t)])

    def end(self) -> list[Delta]:
        """The output is over. Text still waiting in a header that never showed Harmony structure (a short
        output that never reached `<|message|>`) comes out as content, with the error recorded; a real
        header cut short by the length limit shows nothing."""
        if self._fallback is not None or self._structured or self._header_ids_are_specials():
            return []
        ids, self._header_ids = self._header_ids, []
        return self._fail_many(ids, "that ended before any message began")

    def _header_ids_are_specials(self) -> bool:
        return all(not 0 <= t < NUM_TEXT_TOKENS for t in self._header_ids)

    def _header_too_long(self) -> bool:
        if not self._structured:
            # A first header may begin with its recipient (` to=functions.NAME<|channel|>...`).
            text = self.tokenizer.decode(self._header_ids).lstrip()
            self._structured = text.startswith("to=")
        return not self._structured or len(self._header_ids) > MAX_STRUCTURED_HEADER_TOKENS

    def finish(self) -> ParsedMessage:
        """Everything parsed so far, as one message."""
        return ParsedMessage(
            reasoning="".join(self._texts["reasoning"]) if "reasoning" in self._texts else None,
            content="".join(self._texts["content"]) if "content" in self._texts else None,
            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in self.tool_calls],
            num_reasoning_tokens=self.num_reasoning_tokens,
            error=self.error,
        )

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI finish_reason: "tool_calls" once a call was made, unless the length limit cut a call short."""
        if engine_reason == "length" and self._kind == "tool_call":
            return "length"
        return "tool_calls" if self.tool_calls else engine_reason

    def _begin_message(self) -> list[Delta]:
        self._message_index += 1
        recipient = self._parser.current_recipient or ""
        if recipient.startswith("functions."):
            self._kind = "tool_call"
            call = ToolCall(new_tool_call_id(), recipient.removeprefix("functions."), "")
            self.tool_calls.append(call)
            return [Delta("tool_call", "", self._message_index, len(self.tool_calls) - 1, call.id, call.name)]
        if recipient or self._parser.current_channel == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
        self._texts.setdefault(self._kind, [])
        return []

    def _emit(self, kind: DeltaKind, text: str) -> list[Delta]:
        if not text:
            return []
        if kind == "tool_call":
            call = self.tool_calls[-1]
            call.arguments += text
            return [Delta("tool_call", text, self._message_index, len(self.tool_calls) - 1)]
        self._texts[kind].append(text)
        return [Delta(kind, text, self._message_index)]

    def _fail(self, token_id: int, exc: BaseException) -> list[Delta]:
        return self._fail_many([token_id], f"at output token {self.num_tokens - 1} ({token_id}): {exc}")

    def _fail_many(self, token_ids: list[int], why: str) -> list[Delta]:
        """Give up on Harmony: `token_ids` and everything after stream as plain content."""
        self.error = f"malformed Harmony output {why}"
        self._kind = None
        self._message_index += 1
        self._texts.setdefault("content", [])
        self._fallback = self.tokenizer.detokenizer(skip_special_tokens=True)
        return self._emit("content", self._fallback.add_many(token_ids))


def coalesce(deltas: list[Delta]) -> list[Delta]:
    """Merge adjacent deltas of the same kind, message and tool call; the first one's id/name survive."""
    out: list[Delta] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev and (prev.kind, prev.message_index, prev.tool_call_index) == (
            d.kind,
            d.message_index,
            d.tool_call_index,
        ):
            out[-1] = Delta(
                d.kind,
                prev.text + d.text,
                d.message_index,
                d.tool_call_index,
                prev.tool_call_id,
                prev.tool_name,
            )
        else:
            out.append(d)
    return out


def parse_completion(token_ids: list[int], tokenizer: Tokenizer | None = None) -> ParsedMessage:
    """Non-streaming parse, through the same machinery as streaming (so both give the same result)."""
    parser = OutputParser(tokenizer)
    for t in token_ids:
        parser.process(t)
    parser.end()
    return parser.finish()
