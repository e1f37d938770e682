"""Gemma's tokenizer: a SentencePiece tokenizer.model, built from GGUF metadata or read from a HF folder.

Encoding matches transformers' Gemma tokenizer id for id: SentencePiece does the work, after the
literal CONTROL strings (`<bos>`, `<eos>`, `<pad>`, `<unk>`) are split off and mapped to their ids
(SentencePiece never matches CONTROL pieces in text; transformers does). Decoding drops special
tokens like transformers' `skip_special_tokens=True`. StreamDecoder turns ids into text one at a
time without splitting multi-byte characters that byte-fallback tokens spell across several ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import EdgeError

if TYPE_CHECKING:
    from edge.models.weights.gguf import GGUFFile

# Gemma's chat template from the instruction-tuned checkpoints' tokenizer_config.json (Gemma 3; Gemma 2
# differs only in the system-prompt handling). The GGUF carries none, so the manifest gets this one.
CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# ggml token types (llama.cpp's llama_token_type); SentencePiece's piece types use the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's escaped space

# Gemma's special tokens that tokenizer.model stores as USER_DEFINED (so `<start_of_turn>` typed in
# a prompt is one token) but that are CONTROL in the GGUF and special in transformers, which drops
# them when decoding with skip_special_tokens=True.
_SPECIAL_USER_DEFINED = re.compile(r"<(?:mask|start_of_turn|end_of_turn|unused\d+)>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_GGUF_HINT = "the GGUF's tokenizer metadata is damaged; fetch or re-convert the file"


def _token_id(f: GGUFFile, key: str, default: int, n: int) -> int:
    import numpy as np

    v = f.metadata.get(key, default)
    if not isinstance(v, int | np.integer) or isinstance(v, bool | np.bool_) or not 0 <= v < n:
        raise EdgeError(f"{f.path}: {key} is {str(v)[:40]!r}, not a token id below {n:,}", hint=_GGUF_HINT)
    return int(v)


def build_sentencepiece_from_gguf(f: GGUFFile) -> bytes:
    """A serialized SentencePiece ModelProto equivalent to the GGUF's tokenizer (ids as transformers').

    The recipe (measured: identical ids to transformers on 2,819 strings):
    - one piece per token, in id order; BYTE tokens stay BYTE; unk is UNKNOWN; bos/eos/pad CONTROL;
    - every other CONTROL token (`<start_of_turn>`, `<unusedN>`, ...) and USER_DEFINED token (newline
      runs, HTML tags) is USER_DEFINED, so it matches in text as transformers' added tokens do;
    - the space-run tokens (ids 138-167 in Gemma 3) are stored with real spaces; SentencePiece sees
      spaces as U+2581, so respell them and make them NORMAL, i.e. mergeable like any other piece;
    - every NORMAL piece scores -id: the vocab is in merge order, and the GGUF's -1000 on the space
      runs would forbid those merges (56% of strings then differ).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    meta = f.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise EdgeError(
            f"{f.path}: tokenizer type {kind!r} is not SentencePiece ('llama'), as every Gemma's is",
            hint="give a Gemma GGUF, or a HF folder with tokenizer.model",
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    # Strings and an integer array of the same length: anything else (a string where the list belongs,
    # float types) is refused here rather than inside protobuf.
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, str) for t in tokens)
        or not hasattr(types, "dtype")
        or types.dtype.kind not in "iu"
        or len(types) != len(tokens)
    ):
        raise EdgeError(f"{f.path} has no usable token list (tokens and token types)", hint="re-convert the GGUF")
    n = len(tokens)
    unk = _token_id(f, "tokenizer.ggml.unknown_token_id", 3, n)
    bos = _token_id(f, "tokenizer.ggml.bos_token_id", 2, n)
    eos = _token_id(f, "tokenizer.ggml.eos_token_id", 1, n)
    pad = _token_id(f, "tokenizer.ggml.padding_token_id", 0, n)
    types = [int(t) for t in types]
    Piece = pb.ModelProto.SentencePiece

    m = pb.ModelProto()
    pieces = m.pieces
    for i, (tok, t) in enumerate(zip(tokens, types, strict=True)):
        p = pieces.add()
        p.piece = tok
        if i == unk:
            p.type = Piece.UNKNOWN
        elif i in (bos, eos, pad):
            p.type = Piece.CONTROL
        elif t == _BYTE and _BYTE_PIECE.fullmatch(tok):
            p.type = Piece.BYTE
        elif t == _USER_DEFINED and tok and not tok.strip(" "):  # a run of real spaces
            p.piece = _SPACE * len(tok)
            p.score = -i
        elif t in (_CONTROL, _USER_DEFINED):
            p.type = Piece.USER_DEFINED
        elif t in (_UNUSED, _UNKNOWN):  # SentencePiece allows a single UNKNOWN piece
            p.type = Piece.UNUSED
        else:
            p.score = -i  # NORMAL is the proto's default type
    if len({p.piece for p in pieces}) != len(pieces):  # SentencePiece refuses to load such a model
        counts = Counter(p.piece for p in pieces)
        dupes = [piece for piece, n in counts.items() if n > 1]
        raise EdgeError(f"{f.path}: the token list has duplicate pieces: {dupes[:5]}", hint="re-convert the GGUF")

    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = _BYTE in types
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = (tokens[j] for j in (unk, bos, eos, pad))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", False)
    if not isinstance(space_prefix, bool):
        raise EdgeError(f"{f.path}: tokenizer.ggml.add_space_prefix is not true or false", hint=_GGUF_HINT)
    ns.add_dummy_prefix = space_prefix
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def _decode_byte_run(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class Tokenizer:
    """Gemma's tokenizer over a SentencePiece model (a tokenizer.model path, or its bytes)."""

    def __init__(self, model: bytes | str | Path) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        if isinstance(model, bytes):
            self.model_bytes = model
        else:
            path = Path(model)
            if not path.is_file():
                raise EdgeError(f"{path} does not exist", hint="give a SentencePiece tokenizer.model")
            self.model_bytes = path.read_bytes()
        where = f"{model}: " if not isinstance(model, bytes) else ""
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(self.model_bytes)
            if not proto.pieces:  # SentencePiece "loads" empty bytes, then fails on the first encode
                raise ValueError("it holds no pieces")
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except Exception as e:  # protobuf's DecodeError / SentencePiece's RuntimeError
            raise EdgeError(f"{where}not a SentencePiece model: {e}", hint="give a tokenizer.model file") from e
        # SentencePiece loads pieces that this class cannot use: invalid UTF-8 comes back from protobuf
        # as bytes, and a BYTE piece must spell its byte as <0xNN>.
        Piece = pb.ModelProto.SentencePiece
        for i, p in enumerate(proto.pieces):
            if not isinstance(p.piece, str) or (p.type == Piece.BYTE and not _BYTE_PIECE.fullmatch(p.piece)):
                raise EdgeError(
                    f"{where}not a usable SentencePiece model: piece {i} is {p.piece[:40]!r}",
                    hint="the tokenizer file is damaged; export the bundle again or fetch the tokenizer again",
                )

        self._ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        # Literal strings SentencePiece will not match in text, mapped to their ids by encode().
        literal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)}
        self._literal_ids = literal
        self._literal_re = re.compile("(" + "|".join(map(re.escape, sorted(literal, key=len, reverse=True))) + ")")
        # Each piece's text as decode() emits it: U+2581 is a space; BYTE pieces (<0xNN>) are bytes.
        self._text = [p.piece.replace(_SPACE, " ") for p in proto.pieces]
        self._byte_value = {i: int(p.piece[3:5], 16) for i, p in enumerate(proto.pieces) if p.type == Piece.BYTE}
        self.special_ids = frozenset(literal.values()) | {
            i
            for i, p in enumerate(proto.pieces)
            if p.type == Piece.USER_DEFINED and _SPECIAL_USER_DEFINED.fullmatch(p.piece)
        }

    @classmethod
    def from_gguf(cls, src: str | Path | GGUFFile) -> Tokenizer:
        from edge.models.weights.gguf import GGUFFile

        f = src if isinstance(src, GGUFFile) else GGUFFile(src)
        return cls(build_sentencepiece_from_gguf(f))

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.model"
        if not path.is_file():
            raise EdgeError(
                f"{folder} has no tokenizer.model",
                hint="Gemma checkpoints ship one next to tokenizer.json; download it, or convert from a .gguf",
            )
        return cls(path)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.model_bytes)
        return path

    # --- ids ---

    def _id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    @property
    def vocab_size(self) -> int:
        return len(self._ids)

    @property
    def bos_id(self) -> int | None:
        return self._id("<bos>")

    @property
    def eos_id(self) -> int | None:
        return self._id("<eos>")

    @property
    def pad_id(self) -> int | None:
        return self._id("<pad>")

    @property
    def start_of_turn_id(self) -> int | None:
        return self._id("<start_of_turn>")

    @property
    def end_of_turn_id(self) -> int | None:
        return self._id("<end_of_turn>")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, and end_of_turn for chat."""
        return tuple(i for i in (self.eos_id, self.end_of_turn_id) if i is not None)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    # --- text ---

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if not self._literal_ids:
            return ids + self.sp.encode(text)
        for part in self._literal_re.split(text):  # odd positions are the literals
            if part in self._literal_ids:
                ids.append(self._literal_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids without special tokens, exactly as transformers' decode(ids, skip_special_tokens=True).

        Written out rather than sp.decode because the two differ on invalid UTF-8: transformers'
        ByteFallback decodes each run of consecutive byte tokens at once and, if the run is not valid
        UTF-8, gives one U+FFFD per byte token; SentencePiece replaces only the invalid bytes.
        """
        out: list[str] = []
        run = bytearray()  # the current run of byte-fallback tokens
        n = len(self._text)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            if i in self.special_ids:
                continue
            b = self._byte_value.get(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                out.append(_decode_byte_run(run))
                run = bytearray()
            out.append(self._text[i])
        if run:
            out.append(_decode_byte_run(run))
        return "".join(out)

    def chat_prompt(self, user_text: str) -> str:
        """One user turn and the model's turn opening, as CHAT_TEMPLATE renders it (BOS comes from encode)."""
        return f"<start_of_turn>user\n{user_text.strip()}<end_of_turn>\n<start_of_turn>model\n"

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Feed ids one at a time, get the newly completed text; the pieces add up to tokenizer.decode(ids).

    Byte-fallback tokens spell a character's UTF-8 bytes across several ids; until the last byte
    arrives the partial text ends in U+FFFD, so it is held back. Each step decodes only the ids since
    the last emitted text, plus the previous chunk as context (SentencePiece may treat the first
    piece of a sequence differently, e.g. strip its leading space).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context chunk
        self._read = 0  # end of what has been emitted

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self._prefix : self._read])
        now = self.tok.decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes to U+FFFD, as decode does)."""
        before = self.tok.decode(self.ids[self._prefix : self._read])
        now = self.tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return now[len(before) :]
