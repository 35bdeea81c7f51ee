"""The grammar engine's view of the vocabulary: llguidance's `LLTokenizer` over the verified o200k_base file
and Harmony's named special tokens, built once per process (about a second)."""

from __future__ import annotations

import base64
import functools
import threading

import llguidance

from osserve.harmony.encoding import CALL, RETURN, VOCAB_SIZE, get_tokenizer
from osserve.harmony.vocab import VOCAB_FILENAME, resolve_vocab_dir

# o200k_base's pre-tokenization pattern (tiktoken's), which llguidance needs to tokenize grammar literals
# the way the model's tokenizer does; tests check the two tokenizers agree.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# Where a finished grammar stops: the assistant's stop tokens. A matcher that reached the end of its
# grammar allows only these.
STOP_TOKEN_IDS = (RETURN, CALL)


@functools.cache
def grammar_tokenizer() -> llguidance.LLTokenizer:
    """llguidance's tokenizer for gpt-oss: o200k_base text tokens plus the named Harmony specials (the
    reserved ones are left out, so no grammar ever allows them), `VOCAB_SIZE` mask columns."""
    ranks: dict[bytes, int] = {}
    for line in (resolve_vocab_dir() / VOCAB_FILENAME).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return llguidance.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
        encoder=ranks,
        special_tokens=dict(get_tokenizer().special_tokens),
        pattern=O200K_PATTERN,
        eos_token=list(STOP_TOKEN_IDS),
        n_vocab=VOCAB_SIZE,
    )


def prepare_in_background() -> None:
    """Build `grammar_tokenizer()` on a daemon thread (an engine calls this while it loads its model), so
    the first constrained request does not stall every running one for a second."""
    threading.Thread(target=grammar_tokenizer, name="osserve-grammar-tokenizer", daemon=True).start()
