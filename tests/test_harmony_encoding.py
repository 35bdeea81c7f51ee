"""Offline vocabulary, tokenizer and incremental detokenizer."""

from __future__ import annotations

import os
import random
import shutil
import stat

import pytest

from osserve.config import ModelConfig
from osserve.harmony import encoding as encoding_mod
from osserve.harmony.encoding import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    MESSAGE,
    NUM_TEXT_TOKENS,
    RETURN,
    START,
    VOCAB_SIZE,
    get_encoding,
    get_tokenizer,
)
from osserve.harmony.vocab import (
    VOCAB_FILENAME,
    VOCAB_SHA256,
    VocabHashError,
    ensure_cached_vocab,
    file_sha256,
    resolve_vocab_dir,
)

MULTILINGUAL = "Wetter in Zürich 🦩🪿 𝔘 龘 中文字符 Ω≈ç√ ∫ 🧑‍🚀 नमस्ते"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def genuine_vocab(tmp_path_factory):
    return ensure_cached_vocab(tmp_path_factory.mktemp("cache"))


def _tampered_copy(src, folder):
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / VOCAB_FILENAME
    shutil.copyfile(src, dst)
    data = bytearray(dst.read_bytes())
    data[100] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_cached_vocab_written_from_quicktok_has_genuine_hash(genuine_vocab):
    assert genuine_vocab.name == VOCAB_FILENAME
    assert file_sha256(genuine_vocab) == VOCAB_SHA256
    assert stat.S_IMODE(os.stat(genuine_vocab).st_mode) == 0o644
    assert os.listdir(genuine_vocab.parent) == [VOCAB_FILENAME]  # no temp file left behind
    first = genuine_vocab.read_bytes().splitlines()[0].split()
    assert first == [b"IQ==", b"0"]  # base64("!") rank 0, tiktoken's text format


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OSSERVE_VOCAB_DIR", raising=False)
    assert resolve_vocab_dir() == (tmp_path / "vocab").resolve()
    assert file_sha256(tmp_path / "vocab" / VOCAB_FILENAME) == VOCAB_SHA256


def test_tampered_user_vocab_is_refused(genuine_vocab, tmp_path, monkeypatch):
    bad = _tampered_copy(genuine_vocab, tmp_path / "user")
    with pytest.raises(VocabHashError) as err:
        get_encoding(vocab_dir=tmp_path / "user")
    msg = str(err.value)
    assert str(bad) in msg and VOCAB_SHA256 in msg and file_sha256(bad) in msg
    assert "OSSERVE_VOCAB_DIR" in msg  # says what to do
    monkeypatch.setenv("OSSERVE_VOCAB_DIR", str(tmp_path / "user"))
    with pytest.raises(VocabHashError):
        get_encoding()


def test_tampered_cache_is_refused(genuine_vocab, tmp_path):
    bad = _tampered_copy(genuine_vocab, tmp_path / "cache")
    with pytest.raises(VocabHashError, match="Delete") as err:
        ensure_cached_vocab(tmp_path / "cache")
    assert err.value.path == bad and err.value.found == file_sha256(bad)


def test_user_vocab_dir_overrides_cache(genuine_vocab, tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    shutil.copyfile(genuine_vocab, user / VOCAB_FILENAME)
    seen = []
    real_load = encoding_mod.load_harmony_encoding

    def spy(name):
        seen.append(os.environ["TIKTOKEN_ENCODINGS_BASE"])
        return real_load(name)

    monkeypatch.setattr(encoding_mod, "load_harmony_encoding", spy)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    enc = get_encoding(vocab_dir=user)
    assert seen == [str(user.resolve())]
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ  # restored after loading
    assert enc.decode(enc.encode("hello world")) == "hello world"
    # A user folder without the file falls back to the cache.
    assert resolve_vocab_dir(tmp_path / "empty") != user.resolve()


def test_special_token_ids(tok):
    named = {
        "<|start|>": START,
        "<|end|>": END,
        "<|message|>": MESSAGE,
        "<|channel|>": CHANNEL,
        "<|return|>": RETURN,
        "<|call|>": CALL,
        "<|constrain|>": CONSTRAIN,
        "<|endoftext|>": ENDOFTEXT,
    }
    for text, token_id in named.items():
        assert tok.encode(text, allow_special=True) == [token_id]
        assert tok.special_tokens[text] == token_id
    assert tok.stop_token_ids_for_assistant() == [RETURN, CALL]
    enc = tok.encoding
    assert enc.is_special_token(NUM_TEXT_TOKENS) and not enc.is_special_token(NUM_TEXT_TOKENS - 1)
    assert tok.vocab_size == VOCAB_SIZE == ModelConfig().vocab_size


def test_encode_keeps_special_text_plain(tok):
    ids = tok.encode("a <|start|> b")
    assert START not in ids and tok.decode(ids) == "a <|start|> b"
    assert START in tok.encode("a <|start|> b", allow_special=True)


def test_decode_round_trip_and_non_tokens(tok):
    ids = tok.encode(MULTILINGUAL)
    assert tok.decode(ids) == MULTILINGUAL
    junk = [200000, 200013, 201087, 201088, 250000, -1]  # reserved, past the encoding, negative
    assert tok.decode(junk) == ""
    assert tok.decode(junk, skip_special_tokens=False) == ""
    assert all(tok.is_special(t) for t in junk) and not tok.is_special(ids[0])
    assert tok.decode([START, ids[0]], skip_special_tokens=False) == "<|start|>" + tok.decode([ids[0]])
    assert tok.decode([START, ids[0]]) == tok.decode([ids[0]])


def test_detokenizer_multibyte_characters_split_across_tokens(tok):
    ids = tok.encode(MULTILINGUAL)
    # The test only means something if some characters really span several tokens.
    partial = [t for t in ids if _is_broken_utf8(tok.token_bytes(t))]
    assert len(partial) >= 4
    detok = tok.detokenizer()
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.finish() == MULTILINGUAL == detok.text


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_equals_decode_on_random_ids(tok, seed, skip):
    rng = random.Random(seed)
    specials = [START, END, MESSAGE, RETURN, CALL, 200000, 201088, 300000]
    ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(NUM_TEXT_TOKENS) for _ in range(300)]
    detok = tok.detokenizer(skip_special_tokens=skip)
    streamed = detok.add_many(ids[:150]) + "".join(detok.add(t) for t in ids[150:]) + detok.finish()
    assert streamed == tok.decode(ids, skip_special_tokens=skip)


def _is_broken_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# -- linear-time encoding -----------------------------------------------------------------------------


def test_chunked_encoding_equals_openai_harmony_on_ordinary_text(tok):
    """Texts are cut only where o200k's pre-tokenizer splits anyway: the tokens are exactly
    openai-harmony's own, whatever mix of words, spaces, line breaks, digits, punctuation and scripts."""
    enc = get_encoding()
    rng = random.Random(0)
    alphabet = [
        " ",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\n\n",
        "\t",
        "/",
        "'",
        "'s",
        "a",
        "Z",
        "The",
        " the",
        "é",
        "e\u0301",
        "1",
        "23",
        "!",
        ".",
        ",",
        "_",
        "-",
        "\\",
        "\U0001f600",
        "中",
        "\u00a0",
        "¼",
        "Ⅻ",
    ]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(200, 1200)))
        assert len(text) > encoding_mod.MAX_CHUNK_CHARS
        assert tok.encode(text) == enc.encode(text, disallowed_special=()), repr(text[:120])
    prose = ("Hello, world! The year 2025 brought 3.14 reasons/ways to code; naïve café. " * 40 + "\n") * 5
    assert tok.encode(prose) == enc.encode(prose, disallowed_special=())


@pytest.mark.parametrize("run", ["a", "\U0001f600", " ", "7", "!", "\n/"])
def test_a_million_character_run_encodes_in_linear_time(tok, run):
    """openai-harmony panics on these (its regex overflows) or takes minutes (quadratic merges)."""
    import time

    text = run * (1_000_000 // len(run))
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 20  # about 0.2 to 2 s on a 2-core machine
    assert ids and tok.decode(ids) == text
    # Stopping early: only what is needed to know the text is longer than the limit.
    t0 = time.perf_counter()
    assert len(tok.encode(text, stop_after=1000)) > 1000 or len(ids) <= 1000
    assert time.perf_counter() - t0 < 1.0


def test_stop_after_and_special_tokens(tok):
    text = "hello world " * 500
    full = tok.encode(text)
    cut = tok.encode(text, stop_after=100)
    assert 100 < len(cut) < len(full) and full[: len(cut)] == cut
    assert tok.encode("a <|start|> b <|end|>", allow_special=True) == [64, 220, START, 287, 220, END]
