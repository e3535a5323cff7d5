"""Text to token ids and back, for a Hugging Face folder or a GGUF file.

Both become a `tokenizers.Tokenizer`. A GGUF stores no tokenizer.json, only llama.cpp's metadata
(tokens, merges, token types, a pre-tokenizer name), so we rebuild the Hugging Face tokenizer that
metadata names: same vocabulary, merges, special tokens, normalizer, pre-tokenizer and decoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmcad.errors import LlmcadError
from llmcad.families import family_of_gguf
from llmcad.gguf_file import GGUFFile

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SPECIAL = (UNKNOWN, CONTROL)
# Control tokens that end a turn or a document in the common families. GGUF metadata names
# one EOS; a chat model also ends plain completions with its end-of-text token (Qwen2's
# <|endoftext|> beside <|im_end|>). llama.cpp stops on the same names.
END_OF_GENERATION = frozenset(
    ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>", "</s>", "<end_of_turn>")
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Flavour:
    """How a byte-level BPE vocabulary splits text before merging (`tokenizer.ggml.pre`)."""

    split: str | None = None  # regex splitting text before byte mapping; None: GPT-2's own
    digits: bool = False  # every digit on its own first (StarCoder family)
    nfc: bool = False  # NFC-normalize text first (Qwen2)
    ignore_merges: bool = False  # a pre-token found whole in the vocabulary is kept (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token

    def configure(self, backend: Backend) -> None:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.split is None)
        steps = [pre_tokenizers.Digits(individual_digits=True)] if self.digits else []
        if self.split is not None:
            steps.append(pre_tokenizers.Split(Regex(self.split), behavior="isolated"))
        backend.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
        if self.nfc:
            backend.normalizer = normalizers.NFC()
        backend.decoder = decoders.ByteLevel()


_GPT2 = _Flavour()
_STARCODER = _Flavour(digits=True)
_LLAMA3 = _Flavour(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = _Flavour(split=_QWEN2_SPLIT, nfc=True)
FLAVOURS: dict[str, _Flavour] = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
}


class Tokenizer:
    """Encode, decode, stream-decode and render chat prompts for one model.

    `backend` is the underlying `tokenizers.Tokenizer`; `source` names the file or folder it came from.
    """

    def __init__(
        self,
        backend: Backend,
        source: str,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_token_ids: Sequence[int | None] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.source = source
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # Every id that ends generation: eos plus end-of-turn/message ids the metadata names.
        self.eos_token_ids = frozenset(i for i in (eos_token_id, *extra_eos_token_ids) if isinstance(i, int))
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Size of the token table, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it are parsed as such.

        `add_special_tokens` adds BOS where the model asks for it; pass False for a rendered
        chat template, which writes its own.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for `token_id`, as stored (byte-level spelling for BPE)."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_strings(self, count: int | None = None) -> list[str | None]:
        """The vocabulary entries of ids 0 .. count-1 (all ids by default), None where an id
        has none: what another model's token strings are compared with."""
        count = self.vocab_size if count is None else count
        return [self.backend.id_to_token(i) for i in range(count)]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """Render `messages` (plus template `variables` such as `tools`) with the model's chat template."""
        if self.chat_template is None:
            raise LlmcadError(f"{self.source}: the model has no chat template")
        bos, eos = ("" if i is None else self.decode([i]) for i in (self.bos_token_id, self.eos_token_id))
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos,
                eos_token=eos,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise LlmcadError(f"{self.source}: chat template: {e}") from e

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the chat template, ready for the assistant's turn."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    @cached_property
    def _template(self) -> jinja2.Template:
        """The chat template compiled as transformers does: sandboxed, with its helpers."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise LlmcadError(f"{self.source}: chat template: {e}") from e

    def save(self, folder: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json, which
        `from_hf_folder` reads back as this same tokenizer."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        def name(token_id: int | None) -> str | None:
            return None if token_id is None else self.backend.id_to_token(token_id)

        config = {
            "bos_token": name(self.bos_token_id),
            "eos_token": name(self.eos_token_id),
            "pad_token": name(self.pad_token_id),
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(self.eos_token_ids)}))

    @classmethod
    def from_hf_folder(cls, path: Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise LlmcadError(f"{file}: no such file; a Hugging Face model folder needs one")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:
            raise LlmcadError(f"{file}: not a valid tokenizer.json ({e})") from e
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        def token_id(name: str) -> int | None:
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(token) if token else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in config or "add_eos_token" in config:  # overrides tokenizer.json, as in transformers
            add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
            _set_template(backend, bos if add_bos else None, eos if add_eos else None)
        extra = generation.get("eos_token_id")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # older format: named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            str(path),
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=extra if isinstance(extra, list) else [extra],
            pad_token_id=token_id("pad_token"),
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, file: GGUFFile) -> Tokenizer:
        """Rebuild the tokenizer that a GGUF file's metadata describes."""
        path = file.path
        meta = _Metadata(file.fields, path)
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise LlmcadError(f"{path}: unsupported tokenizer.ggml.model '{kind}' (supported: gpt2, llama)")
        tokens = meta.tokens
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        vocab = {token: i for i, token in enumerate(tokens)}
        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in FLAVOURS:
                raise LlmcadError(f"{path}: unsupported tokenizer.ggml.pre '{pre}' (supported: {', '.join(FLAVOURS)})")
            flavour = FLAVOURS[pre]
            merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
            backend = Backend(models.BPE(vocab, merges, ignore_merges=flavour.ignore_merges))
            flavour.configure(backend)
            add_bos = flavour.add_bos
        elif _sentencepiece_style(file.fields) == "gemma":
            tokens = _gemma_spelling(tokens)
            vocab = {token: i for i, token in enumerate(tokens)}
            backend = _gemma_sentencepiece(meta, tokens, vocab)
            add_bos = True
        else:
            backend = _sentencepiece_bpe(meta, tokens, types, vocab)
            add_bos = True

        # Both are matched whole in text; only special ones are dropped by decode(skip_special_tokens=True).
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in SPECIAL]
        # (Gemma's runs of spaces, respelled as "▁" runs, are pieces of the model, as in transformers)
        user = [AddedToken(t, special=False, normalized=False) for t, k, was in zip(tokens, types, meta.tokens) if k == USER_DEFINED and t == was]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        bos, eos = meta.token_id("bos_token_id"), meta.token_id("eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        _set_template(backend, bos if add_bos else None, eos if add_eos else None)
        return cls(
            backend,
            str(path),
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=(
                meta.token_id("eot_token_id"),
                meta.token_id("eom_token_id"),
                *(i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_GENERATION),
            ),
            pad_token_id=meta.token_id("padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
        )


def token_strings_of_gguf(file: GGUFFile) -> list[str | None]:
    """The vocabulary entry of every id in a GGUF, as the tokenizer `Tokenizer.from_gguf`
    builds spells it (Gemma's runs of spaces as "▁" runs), without building it."""
    tokens = file.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LlmcadError(f"{file.path}: GGUF metadata has no tokenizer.ggml.tokens")
    if file.fields.get("tokenizer.ggml.model") == "llama" and _sentencepiece_style(file.fields) == "gemma":
        tokens = _gemma_spelling(tokens)
        last = {t: i for i, t in enumerate(tokens)}  # a respelling that repeats an entry: the tokenizer keeps the last
        return [t if last[t] == i else None for i, t in enumerate(tokens)]
    return tokens


def token_strings_of_file(file: Path) -> list[str | None]:
    """The vocabulary entry of every id in a tokenizer.json (its model's vocabulary and the
    added tokens), None where an id has none, without building the tokenizer."""
    raw = _read_json(file)
    if not raw:
        raise LlmcadError(f"{file}: no such file; a Hugging Face model folder needs one")
    try:
        vocab = raw["model"]["vocab"]
        pairs = [(i, t) for i, (t, _) in enumerate(vocab)] if isinstance(vocab, list) else [(i, t) for t, i in vocab.items()]
        pairs += [(t["id"], t["content"]) for t in raw.get("added_tokens") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise LlmcadError(f"{file}: unexpected tokenizer.json layout ({e})") from None
    tokens: list[str | None] = [None] * (1 + max((i for i, _ in pairs), default=-1))
    for i, t in pairs:
        tokens[i] = t
    return tokens


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that never split a character.

    Each `add` decodes a short window of recent ids twice, with and without the new one, and
    returns the difference once the window no longer ends in an incomplete UTF-8 sequence
    (U+FFFD), as Hugging Face TGI and vLLM do. Decoding a window, not single ids, keeps the
    spaces that SentencePiece-style decoders attach to or strip from neighbouring tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this have been returned as text

    def add(self, token_id: int) -> str:
        """The text completed by `token_id`, possibly empty."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix : self._read], self._skip)
        text = decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]


class _Metadata:
    """Access to a GGUF file's key-value metadata, with errors naming the file."""

    def __init__(self, fields: dict[str, Any], path: Path):
        self._fields = fields
        self._path = path

    @cached_property
    def tokens(self) -> list[str]:
        return self.require("tokenizer.ggml.tokens")

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise LlmcadError(f"{self._path}: GGUF metadata has no {key}")
        return value

    def token_id(self, name: str) -> int | None:
        """`tokenizer.ggml.{name}`, or None if absent or outside the vocabulary."""
        value = self.get(f"tokenizer.ggml.{name}")
        return value if value is not None and 0 <= value < len(self.tokens) else None


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int], vocab: dict[str, int]) -> Backend:
    """Llama 2 / Mistral style: BPE over "▁"-for-space pieces, unknown bytes as <0xNN> tokens."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        merges = _merges_from_scores(tokens, types, meta.require("tokenizer.ggml.scores"), vocab)
    else:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    unk = meta.token_id("unknown_token_id")
    unk_token = tokens[unk] if unk is not None else None
    backend = Backend(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # as llama.cpp: before every run of text
    space = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), space]) if prefix else space
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def _sentencepiece_style(fields: dict[str, Any]) -> str:
    """How the family of a GGUF's architecture rebuilds a SentencePiece vocabulary."""
    family = family_of_gguf(fields.get("general.architecture"))
    return family.sentencepiece if family is not None else "llama"


def _gemma_spelling(tokens: list[str]) -> list[str]:
    """llama.cpp writes Gemma's tokens of two or more spaces with real spaces; Gemma's own
    tokenizer (which maps " " to "▁" before the model) has them as "▁" runs."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _gemma_sentencepiece(meta: _Metadata, tokens: list[str], vocab: dict[str, int]) -> Backend:
    """Gemma's tokenizer as transformers builds it from a GGUF (its GemmaTokenizer over the
    file's vocabulary): BPE with byte fallback over "▁"-for-space pieces, no prefix space
    (unless the file asks for one), merges rebuilt from the vocabulary (the file has none)
    ranked by the merged token's position in it (Gemma's scores do not follow its merge
    order), a token's splits with the longer left part first."""
    merges = []
    for token in tokens:
        for i in range(len(token) - 1, 0, -1):
            if token[:i] in vocab and token[i:] in vocab:
                merges.append((token[:i], token[i:]))
    unk = meta.token_id("unknown_token_id")
    backend = Backend(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else "<unk>", fuse_unk=True, byte_fallback=True))
    space = normalizers.Replace(" ", "▁")
    prefix = meta.get("tokenizer.ggml.add_space_prefix", False)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), space]) if prefix else space
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: a pair of normal pieces ranks by its merged piece's score."""
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    pairs = [
        (-score, vocab[t[:i]], vocab[t[i:]], t[:i], t[i:])
        for t, score in zip(tokens, scores)
        if t in normal
        for i in range(1, len(t))
        if t[:i] in normal and t[i:] in normal
    ]
    return [(left, right) for *_, left, right in sorted(pairs)]


def _set_template(backend: Backend, bos: int | None, eos: int | None) -> None:
    """Make encode(add_special_tokens=True) put `bos` first and `eos` last (None: nothing)."""
    first = [(backend.id_to_token(bos), bos)] if bos is not None else []
    last = [(backend.id_to_token(eos), eos)] if eos is not None else []
    single = [t for t, _ in first] + ["$A"] + [t for t, _ in last]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=first + last)


def _read_json(file: Path) -> dict:
    """The JSON object in `file`, or {} if there is no such file."""
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmcadError(f"{file}: not valid JSON ({e})") from e


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    """transformers' `tojson`: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)
