"""benchmarks/gpu_suite.py --tiny: every section reports (numbers or an explicit skip), every check passes, and the
run needs none of the package's optional dependencies. Run in a subprocess, exactly as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = 6
#: Sections allowed to skip here, and the only reason each may give.
ALLOWED_SKIPS = {"4 head-wise KV cache": "selective_attention.cache not installed"}


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output", str(tmp_path), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    report = tmp_path / "gpu_suite.json"
    assert report.exists(), f"no report written:\n{done.stderr[-3000:]}"
    return done, json.loads(report.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_suite")
    done, result = _run(output)
    return done, result, output


def test_every_section_reports_and_every_check_passes(tiny_run):
    done, result, _ = tiny_run
    sections = result["sections"]
    assert len(sections) == SECTIONS
    for name, section in sections.items():
        if section["status"] == "skipped":
            assert ALLOWED_SKIPS.get(name) == section["reason"], f"{name} skipped: {section['reason']}"
            continue
        assert section["status"] == "ok", f"{name}: {section['status']} {section.get('reason', '')}\n" \
                                          f"{section.get('traceback', '')}\n{section.get('checks')}"
        assert section["rows"], f"{name} reported no numbers"
        assert all(check["passed"] for check in section["checks"])
    assert done.returncode == 0, done.stderr[-3000:]


def test_correctness_checks_ran(tiny_run):
    """The sections that check something really did (a section returning no checks would pass vacuously)."""
    _, result, _ = tiny_run
    counts = {name: len(section.get("checks", [])) for name, section in result["sections"].items()}
    assert counts["1 masked attention == plain kernels"] >= 12  # 2 kernels x 2 dtypes x 3 checks (no flash on CPU)
    assert counts["3 probe vs reference detection"] == 1
    assert counts["5 tree-kernel decode attention"] == 2
    assert counts["6 converted GQA decode"] >= 1
    if result["sections"]["4 head-wise KV cache"]["status"] != "skipped":
        assert counts["4 head-wise KV cache"] == 4


def test_numbers_and_metadata(tiny_run):
    _, result, output = tiny_run
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["tiny"] is True and meta["torch"] and meta["transformers"]
    assert meta["shapes"]["big"]["kv_heads"] < meta["shapes"]["big"]["heads"]  # GQA, as Llama-3.1-8B
    assert meta["optional_modules_loaded"] == [], "the suite must run with torch + transformers + accelerate only"
    sections = result["sections"]
    prefill = sections["2 masked-head prefill overhead"]["rows"]
    assert {row["context"] for row in prefill} == {"8K", "32K"}
    assert all(row["ms"] > 0 and row["ratio"] > 0 for row in prefill)
    detection = sections["3 probe vs reference detection"]["rows"]
    assert [row["context"] for row in detection if row["trial"] == "cost"] == ["8K", "32K"]
    assert all(row["probe_s"] > 0 and row["reference_s"] > 0 for row in detection if row["trial"] == "cost")
    tree = sections["5 tree-kernel decode attention"]["rows"]
    assert {row["keys"] for row in tree} == {"32K", "128K"} and all(row["ms"] > 0 for row in tree)
    gqa = sections["6 converted GQA decode"]["rows"]
    assert [row["kv_heads"] for row in gqa] == [2, 4, 1] and all(row["tokens_per_s"] > 0 for row in gqa)
    assert gqa[1]["kv_bytes_ratio"] == 2.0 and gqa[2]["kv_bytes_ratio"] == 0.5  # measured from the cache tensors
    markdown = (output / "gpu_suite.md").read_text()
    assert all(name in markdown for name in sections)


@pytest.fixture(scope="module")
def suite_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_suite


def test_section_selection(suite_module):
    assert suite_module.parse_args(["--tiny", "--output", "x", "--sections", "5,3"]).wanted == [3, 5]
    assert suite_module.parse_args(["--tiny", "--output", "x"]).wanted == list(range(1, SECTIONS + 1))


@pytest.mark.parametrize("argv, message", [
    (["--output", "x", "--device", "cpu"], "need a CUDA device"),
    (["--tiny", "--output", "x", "--sections", "9"], "numbered 1 to 6"),
    (["--tiny", "--output", "x", "--sections", "one"], "expected numbers"),
    (["--tiny", "--output", "x", "--model", "/nonexistent/model"], "is not a folder"),
])
def test_bad_arguments_are_refused_before_any_work(suite_module, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        suite_module.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_with_the_embedded_model(tmp_path, embedded_model_dir):
    """--model adds the real checkpoint's rows to sections 1 and 3."""
    done, result = _run(tmp_path, "--model", str(embedded_model_dir), "--sections", "1,3")
    assert done.returncode == 0, done.stderr[-3000:]
    models = {row["model"] for row in result["sections"]["1 masked attention == plain kernels"]["rows"]}
    assert str(embedded_model_dir) in models
    trials = result["sections"]["3 probe vs reference detection"]["rows"]
    assert any(row["model"] == str(embedded_model_dir) and row["reference_s"] for row in trials)


def test_a_failing_section_is_reported_and_the_suite_goes_on(suite_module, tmp_path):
    """A section that raises gets status "error" with its traceback; a skip keeps its reason; a failed check
    makes the section "failed" (and the exit code 1)."""
    import types

    from gpu_sections.common import Skip, Suite, check

    def module(run):
        return types.SimpleNamespace(__doc__="A made-up section.", run=run)

    def raises(suite):
        raise RuntimeError("boom")

    def skips(suite):
        raise Skip("no reason to run")

    suite = Suite(torch.device("cpu"), tiny=True)
    error = suite_module.run_section(suite, module(raises))
    assert error["status"] == "error" and "boom" in error["reason"] and "RuntimeError" in error["traceback"]
    skipped = suite_module.run_section(suite, module(skips))
    assert skipped == dict(status="skipped", reason="no reason to run", about="A made-up section.",
                           seconds=skipped["seconds"])
    failed = suite_module.run_section(suite, module(lambda s: dict(rows=[{"x": 1}], checks=[check("c", False)])))
    assert failed["status"] == "failed"


def test_headwise_section_skips_without_the_cache_package(suite_module, monkeypatch):
    from gpu_sections import headwise
    from gpu_sections.common import Skip

    monkeypatch.setitem(sys.modules, "selective_attention.cache", None)  # as if the package were absent
    with pytest.raises(Skip, match="selective_attention.cache not installed"):
        headwise._import_cache()
