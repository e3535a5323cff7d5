"""llmcad.tokenizer against transformers, on the real SmolLM2 GGUF and on tiny GGUF files written here."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import gguf
import pytest
import regex
from tokenizers import decoders, pre_tokenizers
from transformers import AutoTokenizer

from llmcad.errors import LlmcadError
from llmcad.gguf_file import GGUFFile
from llmcad.tokenizer import FLAVOURS, Tokenizer

PIECES = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "don't I'LL we've THEY'RE it's",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
    "for (int i = 0; i < n; i++) { sum += x[i]; }",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "<div class=\"a\">&nbsp;</div>",
    "x = {'k': [1, 2.5, -3e10], \"s\": None}  # comment",
    "1234567890 3.14159 1,000,000 0x1F 42nd",
    "a  1  22   333",
    "    indented\n\n\n\ttabbed\t\tline  \n",
    "   ",
    "\n",
    "trailing   ",
    "你好，世界！这是一个测试。",
    "日本語のテキスト、カタカナ ー",
    "한국어 텍스트입니다",
    "Привет, мир! Ελληνικά",
    "שלום עולם مرحبا بالعالم",
    "😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "e\u0301 n\u0303 a\u030a Zalgo: Z\u0351\u0308\u036ba\u0350l",
    "\u00a0non\u2003breaking\u3000spaces\u200b",
    "Café naïve résumé façade Ångström",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<|endoftext|>",
    "text<|im_end|>more <repo_name> <file_sep>",
    "<|im_start|",
    "math: ∑ x² ≤ ∞, α→β",
]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """The fixed pieces, then seeded random joins of pieces and random characters."""
    rng = random.Random(seed)
    chars = " \t\n0123456789abcXYZ.,'!-_é你😀\u0301\u00a0"
    texts = list(PIECES)
    while len(texts) < n:
        parts = rng.sample(PIECES, rng.randint(2, 4))
        parts.insert(rng.randrange(len(parts) + 1), "".join(rng.choices(chars, k=rng.randint(1, 12))))
        texts.append(rng.choice(["", " ", "\n", "  "]).join(parts))
    return texts


CORPUS = corpus()


def write_gguf(path: Path, **metadata) -> Path:
    """A GGUF holding only metadata, each keyword `name` written by `GGUFWriter.add_{name}`."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in metadata.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(path))


def mismatches(ours, theirs, items) -> list:
    """The items where `ours(item) != theirs(item)`, with both results (the first few)."""
    return [(item, a, b) for item in items if (a := ours(item)) != (b := theirs(item))][:5]


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> tuple[list[str], str]:
    decoder = tok.stream_decoder(skip_special_tokens)
    return [decoder.add(i) for i in ids], decoder.flush()


@pytest.fixture(scope="module")
def smol(smollm2) -> Tokenizer:
    """From the real SmolLM2 GGUF (conftest's `smollm2`: `llmcad.hub.resolve_model("smollm2-135m")`)."""
    return load(smollm2)


@pytest.fixture(scope="module")
def smol_ref(smollm2):
    """transformers' tokenizer for the same file, with its one known gap filled: it does not know
    llama.cpp's "smollm" pre-tokenizer and splits like GPT-2, while SmolLM2's own tokenizer.json
    (and llama.cpp) split off every digit first, so "a  1" is a|ĠĠ|1 there, not a|Ġ|Ġ|1."""
    ref = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return ref


def test_gguf_encodes_and_decodes_like_transformers(smol, smol_ref):
    assert smol.vocab_size == len(smol_ref) == 49152
    for add in (True, False):
        assert not mismatches(
            lambda t: smol.encode(t, add), lambda t: smol_ref.encode(t, add_special_tokens=add), CORPUS
        )
    ids = [smol_ref.encode(t) for t in CORPUS]
    for skip in (False, True):
        assert not mismatches(
            lambda i: smol.decode(i, skip), lambda i: smol_ref.decode(i, skip_special_tokens=skip), ids
        )


def test_gguf_special_tokens(smol):
    im_start, im_end = smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (im_start, im_end, im_end)
    # the named EOS plus the family's end-of-text control token (END_OF_GENERATION)
    assert smol.eos_token_ids == {im_end, smol.token_to_id("<|endoftext|>")}
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)  # add_bos_token is false
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert [smol.id_to_token(i) for i in smol.encode("a  1")] == ["a", "ĠĠ", "1"]


def test_chat_template_matches_transformers(smol, smol_ref):
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Und 你好?"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            expected = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert smol.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_chat_template_helpers_and_errors(smol):
    template = "{{ strftime_now('%Y') }} {{ messages | tojson }} {{ bos_token }}{{ eos_token }}"
    tok = Tokenizer(smol.backend, "test", bos_token_id=1, eos_token_id=2, chat_template=template)
    rendered = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert rendered == f'{datetime.now().year} [{{"role": "user", "content": "<é>"}}] <|im_start|><|im_end|>'
    bad = Tokenizer(smol.backend, "test", chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LlmcadError, match="roles must alternate"):
        bad.apply_chat_template([])
    with pytest.raises(LlmcadError, match="no chat template"):
        Tokenizer(smol.backend, "test").apply_chat_template([])


def test_hf_folder(smol, smol_ref, tmp_path):
    smol_ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.vocab_size == smol.vocab_size
    assert not mismatches(lambda t: tok.encode(t), lambda t: smol.encode(t), CORPUS)
    ids = [smol.encode(t) for t in CORPUS]
    assert not mismatches(lambda i: tok.decode(i), lambda i: smol.decode(i), ids)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.chat_template) == (1, {2}, smol.chat_template)

    # The template in tokenizer_config.json rather than chat_template.jinja; more eos ids in generation_config.json.
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.chat_template, tok.eos_token_ids) == (template, {0, 2})


def test_stream_decoder(smol):
    assert len(smol.encode("😀", add_special_tokens=False)) > 1  # an emoji spans several byte tokens
    rng = random.Random(1)
    held_back = 0
    for _ in range(100):
        ids = smol.encode("".join(rng.choices(CORPUS, k=3)), add_special_tokens=False)
        for skip in (False, True):
            pieces, tail = stream(smol, ids, skip)
            assert not any("\ufffd" in p for p in pieces)
            assert "".join(pieces) + tail == smol.decode(ids, skip)
            held_back += pieces.count("")
    assert held_back > 0

    ids = smol.encode("ab😀", add_special_tokens=False)[:-1]  # an incomplete character at the end
    pieces, tail = stream(smol, ids)
    assert "".join(pieces) == "ab" and tail.startswith("\ufffd") and "ab" + tail == smol.decode(ids)


def llamacpp_split(regexes: list[str], text: str) -> list[str]:
    """llama.cpp's pre-tokenizer: each regex in turn cuts every piece into its matches and the gaps between."""
    pieces = [text] if text else []
    for pattern in regexes:
        cut = []
        for piece in pieces:
            start = 0
            for m in regex.finditer(pattern, piece):
                cut += [piece[start : m.start()], m.group()]
                start = m.end()
            cut.append(piece[start:])
        pieces = [p for p in cut if p]
    return pieces


# The regexes llama.cpp's llama-vocab.cpp uses for each `tokenizer.ggml.pre` ("default" is our GPT-2 fallback).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMACPP_REGEXES = {
    "default": [GPT2],
    "gpt-2": [GPT2],
    "smollm": [r"\p{N}", GPT2],
    "starcoder": [r"\p{N}", GPT2],
    "llama-bpe": [LLAMA3],
    "llama3": [LLAMA3],
    "llama-v3": [LLAMA3],
    "qwen2": [QWEN2],
}


@pytest.mark.parametrize("pre", sorted(FLAVOURS))
def test_pre_tokenizer_flavours_split_like_llama_cpp(pre, tmp_path):
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab"]
    metadata = dict(tokenizer_model="gpt2", tokenizer_pre=pre, token_list=tokens, token_merges=["a b"])
    tok = load(write_gguf(tmp_path / "t.gguf", **metadata))
    byte_level = decoders.ByteLevel()
    for text in CORPUS:
        pieces = [byte_level.decode([p]) for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == llamacpp_split(LLAMACPP_REGEXES[pre], text), text
    assert (tok.encode("e\u0301") == tok.encode("é")) == (pre == "qwen2")  # Qwen2 normalizes to NFC


SPM_WORDS = "▁ e h l o t w r d a n i s ▁t he ▁the ▁h ll llo ▁he ▁hello ▁w or ▁wor ld ▁world an ▁an in is ▁is ▁i".split()


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    """A tiny Llama-2-style GGUF: SentencePiece pieces ranked by score, no merges, <0xNN> byte fallback."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_WORDS
    return write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        tokenizer_model="llama",
        token_list=tokens,
        token_types=[2, 3, 3] + [6] * 256 + [1] * len(SPM_WORDS),
        token_scores=[0.0] * 259 + [-float(i) for i in range(len(SPM_WORDS))],
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_sentencepiece_gguf(spm):
    tok, ref = load(spm), AutoTokenizer.from_pretrained(spm.parent, gguf_file=spm.name)
    texts = [t for t in CORPUS if not t.startswith(" ") and "<" not in t]  # see below for those
    assert not mismatches(lambda t: tok.encode(t), lambda t: ref.encode(t), texts)
    assert not mismatches(lambda t: tok.decode(tok.encode(t)), lambda t: ref.decode(ref.encode(t)), texts)
    assert tok.decode(tok.encode("héllo wörld 😀"), skip_special_tokens=True) == "héllo wörld 😀"

    # Like llama.cpp and SentencePiece itself, a space goes before every run of text, even one that
    # already starts with a space or follows a special token (transformers' Metaspace does neither).
    def pieces(text):
        return [tok.id_to_token(i) for i in tok.encode(text)]

    assert pieces(" hello") == ["<s>", "▁", "▁hello"]
    assert pieces("hello</s>world") == ["<s>", "▁hello", "</s>", "▁world"]

    ids = tok.encode("the world 你好 😀 is an hello", add_special_tokens=False)
    for skip in (False, True):
        pieces_, tail = stream(tok, ids, skip)
        assert not any("\ufffd" in p for p in pieces_)
        assert "".join(pieces_) + tail == tok.decode(ids, skip) == "the world 你好 😀 is an hello"


def test_errors(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", tokenizer_model="bert", token_list=["[CLS]"])
    with pytest.raises(LlmcadError, match=rf"{regex.escape(str(path))}: unsupported tokenizer.ggml.model 'bert'"):
        load(path)
    path = write_gguf(tmp_path / "pre.gguf", tokenizer_model="gpt2", tokenizer_pre="klingon", token_list=["a"])
    with pytest.raises(LlmcadError, match="unsupported tokenizer.ggml.pre 'klingon'"):
        load(path)
    path = write_gguf(tmp_path / "empty.gguf", tokenizer_model="gpt2")
    with pytest.raises(LlmcadError, match="no tokenizer.ggml.tokens"):
        load(path)
    with pytest.raises(LlmcadError, match=regex.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmcadError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
