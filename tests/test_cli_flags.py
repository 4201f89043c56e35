"""Flags mean one thing everywhere: `--output`, `--mask-mode`, `--num-heads`; old spellings parse as hidden aliases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selective_attention.cli import build_parser, main


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("argv", [
    ["needle", "--output-dir", "runs/x"],
    ["attention-map", "--out", "runs/x"],
    ["convert", "--kv-heads", "9", "--out", "runs/x"],
    ["reproduce", "--output-dir", "runs/x"],
])
def test_old_output_spellings_are_aliases_of_output(parser, argv):
    assert str(parser.parse_args(argv).output) == "runs/x"


def test_output_is_the_documented_flag(parser):
    for command in ("needle", "attention-map", "convert", "detect", "tree-ppl", "passkey", "reproduce"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        assert "--output" in text and "--output-dir" not in text and "--out " not in text, command


def test_demo_flags(parser):
    old = parser.parse_args(["demo", "--heads", "3", "--mode", "uniform"])
    new = parser.parse_args(["demo", "--num-heads", "3", "--mask-mode", "uniform"])
    assert (old.num_heads, old.mask_mode) == (new.num_heads, new.mask_mode) == (3, "uniform")
    assert not re.search(r"--mode\b", parser._subparsers._group_actions[0].choices["demo"].format_help())


def test_output_is_required_where_it_has_no_default(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["needle"])
    assert exit_info.value.code == 2 and "--output is required" in capsys.readouterr().err
    assert parser.parse_args(["attention-map"]).output == Path("attention_maps")
