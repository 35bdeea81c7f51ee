"""Structured outputs: a request's response format or forced tool call as a grammar over the whole Harmony
completion (`grammar`), enforced token by token through a bitmask (`matcher`), with llguidance as the
grammar engine (`tokenizer`). Bottom layer: imports only harmony and llguidance."""

from osserve.structured.grammar import StructuredOutput, answer_reserve, build_structured, check_schema
from osserve.structured.matcher import BITMASK_WIDTH, GrammarMatcher, allocate_bitmask, fill_bitmasks

__all__ = [
    "BITMASK_WIDTH",
    "GrammarMatcher",
    "StructuredOutput",
    "allocate_bitmask",
    "answer_reserve",
    "build_structured",
    "check_schema",
    "fill_bitmasks",
]
