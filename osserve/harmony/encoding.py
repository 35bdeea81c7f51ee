"""The Harmony encoding (offline) and the tokenizer the engine and server use.

`get_encoding()` loads openai-harmony's `HARMONY_GPT_OSS` encoding from the verified local vocabulary
(see `vocab.py`); `get_tokenizer()` wraps it in `Tokenizer`: plain-text encode, decode that never crashes
on ids outside the vocabulary, special-token ids, and an incremental detokenizer for streaming.

`encode_ordinary` is how every text of a request becomes tokens, in time linear in its length: o200k's
byte-pair merge is quadratic in the length of one pre-tokenizer piece (a run of one character: 64k
characters take seconds) and openai-harmony panics on runs of about a million (its regex overflows). So
the text goes to openai-harmony in chunks of at most `MAX_CHUNK_CHARS`, cut where o200k's pre-tokenizer
would split anyway (the tokens are then exactly those of the whole text); only a stretch of more than
`MAX_CHUNK_CHARS // 2` characters with no such place (one run of a character, a very long number) is cut
at a fixed length, as tiktoken bounds its own work. openai-harmony's `encode` releases the GIL, so this
may run on worker threads while the event loop keeps serving.
"""

from __future__ import annotations

import codecs
import functools
import os
import re
import threading
from collections.abc import Iterable, Iterator

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

from osserve.harmony.vocab import ENV_CACHE_DIR, ENV_VOCAB_DIR, resolve_vocab_dir

# Ids 0..199997 are o200k_base text tokens; 199998 and up are Harmony specials (named or reserved).
NUM_TEXT_TOKENS = 199998
# Rows of the model's embedding / unembedding: every id the model can produce is below this.
VOCAB_SIZE = 201088

ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

_ENV_TIKTOKEN_BASE = "TIKTOKEN_ENCODINGS_BASE"
_env_lock = threading.Lock()

MAX_CHUNK_CHARS = 256
# Places where o200k's pre-tokenizer always splits and where neither side's match depends on what lies
# across (so encoding the two sides apart gives the same tokens): before a space that follows a non-space
# (no piece has a space after its first character); after a line break followed by anything but
# whitespace or "/" (only "/" continues a punctuation-and-newlines piece); between an ASCII letter and an
# ASCII digit or punctuation mark other than "'" (a letter piece continues only with letters, marks or a
# contraction). NOTE: Python's \s is a superset of the regex crate's, so (?<=\S) is safe.
_SAFE_CUT = re.compile(r"(?<=\S)(?= )|(?<=[\r\n])(?=[^\s/])|(?<=[A-Za-z])(?=[0-9!-&(-/:-@\[-`{-~])")


def get_encoding(vocab_dir: str | os.PathLike[str] | None = None) -> HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded offline from the verified o200k_base vocabulary.

    `vocab_dir` (else `$OSSERVE_VOCAB_DIR`) may name a folder holding `o200k_base.tiktoken`; otherwise
    osserve's cache is used. Cached per (argument, environment). Raises `VocabHashError` on a wrong file.
    """
    key = str(vocab_dir) if vocab_dir is not None else None
    return _load_encoding(key, os.environ.get(ENV_VOCAB_DIR), os.environ.get(ENV_CACHE_DIR))


@functools.lru_cache(maxsize=4)
def _load_encoding(vocab_dir: str | None, _env_vocab: str | None, _env_cache: str | None) -> HarmonyEncoding:
    folder = resolve_vocab_dir(vocab_dir)
    # NOTE: openai-harmony only reads this variable while loading; we set it for that moment and put
    # back what was there, under a lock because the environment is process-wide.
    with _env_lock:
        previous = os.environ.get(_ENV_TIKTOKEN_BASE)
        os.environ[_ENV_TIKTOKEN_BASE] = str(folder)
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        finally:
            if previous is None:
                del os.environ[_ENV_TIKTOKEN_BASE]
            else:
                os.environ[_ENV_TIKTOKEN_BASE] = previous


def text_chunks(text: str) -> Iterator[str]:
    """`text` in pieces of at most MAX_CHUNK_CHARS characters whose tokens, concatenated, are the text's
    (except inside a stretch of more than MAX_CHUNK_CHARS // 2 characters that o200k never splits)."""
    start, n = 0, len(text)
    while n - start > MAX_CHUNK_CHARS:
        half = start + MAX_CHUNK_CHARS // 2
        cut = _SAFE_CUT.search(text, half, start + MAX_CHUNK_CHARS + 1)
        # NOTE: no safe place in [half, start + MAX_CHUNK_CHARS]: half lies in a stretch o200k never splits
        # (one BPE piece of over 128 characters); shorter forced pieces keep its quadratic merge cheap.
        end = cut.start() if cut is not None else half
        yield text[start:end]
        start = end
    yield text[start:]


def encode_ordinary(encoding: HarmonyEncoding, text: str, stop_after: int | None = None) -> list[int]:
    """o200k tokens of `text` (special-token text stays text), in linear time (see the module docstring).

    With `stop_after`, encoding stops once more than that many tokens are found: the result is then cut
    short, and its length (> stop_after) says only that the text is longer than that.
    """
    inner = encoding._inner  # NOTE: the Rust method; the Python wrapper scans for special tokens first
    ids: list[int] = []
    for chunk in text_chunks(text):
        try:
            ids += inner.encode(chunk, [])
        except UnicodeEncodeError:  # lone surrogates, as openai-harmony's wrapper treats them
            ids += inner.encode(chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), [])
        if stop_after is not None and len(ids) > stop_after:
            break
    return ids


def get_tokenizer(vocab_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The shared `Tokenizer` over `get_encoding(vocab_dir)`."""
    return _tokenizer_for(get_encoding(vocab_dir))


@functools.lru_cache(maxsize=4)
def _tokenizer_for(encoding: HarmonyEncoding) -> Tokenizer:
    return Tokenizer(encoding)


class Tokenizer:
    """o200k_base + Harmony specials, as the engine and server need them.

    Ids that are not real tokens (reserved specials, ids past the encoding, negative ids) decode to ""
    so that a random-weight model's output never crashes decoding.
    """

    vocab_size = VOCAB_SIZE
    num_text_tokens = NUM_TEXT_TOKENS

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self.encoding = encoding
        # Named specials only: the ~1,000 `<|reserved_N|>` entries carry no meaning and decode to "".
        names = sorted(s for s in encoding.special_tokens_set if not s.startswith("<|reserved_"))
        self.special_tokens: dict[str, int] = {
            name: encoding.encode(name, allowed_special={name})[0] for name in names
        }
        self._special_bytes = {i: name.encode() for name, i in self.special_tokens.items()}
        self._text_bytes: dict[int, bytes] = {}
        every_special = sorted(encoding.special_tokens_set, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, every_special)))

    def encode(self, text: str, allow_special: bool = False, *, stop_after: int | None = None) -> list[int]:
        """Token ids of `text`, in linear time. Special-token text such as "<|start|>" stays plain text
        unless allowed. `stop_after`: as in `encode_ordinary` (the result may be cut short)."""
        if not allow_special:
            return encode_ordinary(self.encoding, text, stop_after)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self.encode(text[start : m.start()], stop_after=_left(stop_after, ids))
            ids.append(
                self.special_tokens.get(m.group())
                or self.encoding.encode(m.group(), allowed_special="all")[0]
            )
            start = m.end()
            if stop_after is not None and len(ids) > stop_after:
                return ids
        return ids + self.encode(text[start:], stop_after=_left(stop_after, ids))

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; invalid UTF-8 becomes U+FFFD. Named specials appear unless skipped."""
        data = b"".join(self.token_bytes(t, skip_special_tokens) for t in token_ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """The raw bytes of one token (a text token may hold part of a UTF-8 character)."""
        if 0 <= token_id < NUM_TEXT_TOKENS:
            data = self._text_bytes.get(token_id)
            if data is None:
                # surrogateescape round-trips any byte string through openai-harmony's str API.
                text = self.encoding.decode([token_id], errors="surrogateescape")
                data = self._text_bytes[token_id] = text.encode("utf-8", errors="surrogateescape")
            return data
        if skip_special_tokens:
            return b""
        return self._special_bytes.get(token_id, b"")

    def is_special(self, token_id: int) -> bool:
        """True for anything that is not an o200k_base text token (named, reserved or out of range)."""
        return not 0 <= token_id < NUM_TEXT_TOKENS

    def stop_token_ids_for_assistant(self) -> list[int]:
        """Where an assistant turn's sampling stops: <|return|> (done) and <|call|> (tool call)."""
        return sorted(self.encoding.stop_tokens_for_assistant_actions())

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh `IncrementalDetokenizer` over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens)


def _left(stop_after: int | None, ids: list[int]) -> int | None:
    return None if stop_after is None else stop_after - len(ids)


class IncrementalDetokenizer:
    """Token ids in, text deltas out, for streaming.

    A character split across tokens is held back until complete, so no delta ever ends in a broken
    character; the concatenation of all deltas plus `finish()` equals `Tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The stdlib incremental decoder keeps an incomplete trailing sequence for the next call and
        # replaces exactly what a one-shot decode would replace.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly complete text (possibly "")."""
        delta = self._decoder.decode(self.tokenizer.token_bytes(token_id, self.skip_special_tokens))
        self.text += delta
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Feed several tokens; return their newly complete text."""
        return "".join([self.add(t) for t in token_ids])

    def finish(self) -> str:
        """End of stream: bytes of an unfinished character come out as U+FFFD."""
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta
