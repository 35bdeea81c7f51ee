"""One request's grammar state (`GrammarMatcher`) and the token bitmask it fills before each sample.

The bitmask is numpy int32 `[rows, BITMASK_WIDTH]`, one bit per vocabulary id (bit `t % 32` of word
`t // 32`; 1 = allowed), the layout `apply_token_bitmask_` (osserve.kernels) reads on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np

from osserve.harmony.encoding import VOCAB_SIZE
from osserve.structured.grammar import StructuredOutput
from osserve.structured.vocabulary import grammar_tokenizer

BITMASK_WIDTH = (VOCAB_SIZE + 31) // 32
# Errors name the offending token, not the whole parser state and grammar (they end up in logs).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


def allocate_bitmask(rows: int) -> np.ndarray:
    """A `[rows, BITMASK_WIDTH]` int32 bitmask with every token allowed."""
    return np.full((rows, BITMASK_WIDTH), -1, dtype=np.int32)


class GrammarMatcher:
    """Where one sample stands in its grammar: `fill_bitmask` says which tokens may come next, `accept`
    moves past the sampled one, `done` says the grammar reached its end (or was broken)."""

    def __init__(self, structured: StructuredOutput, _matcher: llguidance.LLMatcher | None = None):
        self.kind = structured.kind
        self._structured = structured
        self._matcher = _matcher or llguidance.LLMatcher(
            grammar_tokenizer(), structured.grammar, log_level=0, limits=_LIMITS
        )
        if self._matcher.is_error():
            raise ValueError(f"the {self.kind} grammar cannot be compiled: {self._matcher.get_error()}")

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (the samples of an n > 1 request), without compiling."""
        return GrammarMatcher(self._structured, self._matcher.deep_copy())

    def accept(self, token_id: int) -> bool:
        """Move past a sampled token; False if the grammar did not allow it (the matcher is then broken:
        `error` says why, and `done` is true)."""
        return self._matcher.consume_token(token_id)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]`."""
        llnp.fill_next_token_bitmask(self._matcher, bitmask, row)

    @property
    def terminated(self) -> bool:
        """The grammar is complete (its stop token was accepted)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def fill_bitmasks(matchers: Sequence[GrammarMatcher], bitmask: np.ndarray | None = None) -> np.ndarray:
    """Row i of the bitmask <- the allowed next tokens of `matchers[i]`; several rows are computed on a
    thread pool (llguidance's executor, outside the GIL). Returns the bitmask (allocated if not given)."""
    if bitmask is None:
        bitmask = np.empty((len(matchers), BITMASK_WIDTH), dtype=np.int32)
    if len(matchers) == 1:
        matchers[0].fill_bitmask(bitmask, 0)
    else:
        pairs = [(m._matcher, i) for i, m in enumerate(matchers)]
        llnp.fill_next_token_bitmask_par(_executor(), pairs, bitmask)
    return bitmask
