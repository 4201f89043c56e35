"""gpu_suite.json + gpu_suite.md: one status per section (ok, failed, error, skipped), its rows and checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

STATUS_TEXT = {"ok": "ok", "failed": "FAILED (a check did not pass)", "error": "ERROR (raised)", "skipped": "skipped"}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 1e4:
        return f"{value:,}"
    return str(value).replace("|", "/")


def table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# selective-attention GPU suite", "",
             f"Device **{meta['device_name']}** ({meta['device']}), torch {meta['torch']}, transformers "
             f"{meta['transformers']}, dtype {meta['dtype']}, "
             f"{'--tiny (toy sizes)' if meta['tiny'] else 'full sizes'}, {meta['seconds']:.1f} s in all. "
             f"Command: `{meta['command']}`", "",
             "| section | status | seconds |", "|---|---|---:|"]
    for name, section in result["sections"].items():
        status = STATUS_TEXT[section["status"]]
        if section["status"] == "skipped":
            status += f": {section['reason']}"
        lines.append(f"| {name} | {status} | {section['seconds']:.1f} |")
    for name, section in result["sections"].items():
        lines += ["", f"## {name}", "", section["about"], ""]
        if section["status"] == "skipped":
            lines.append(f"skipped: {section['reason']}")
            continue
        if section["status"] == "error":
            lines += [f"error: `{section['reason']}`", "", "```", section.get("traceback", "").rstrip(), "```"]
        if section.get("rows"):
            lines += table(section["rows"]) + [""]
        for item in section.get("checks", []):
            details = ", ".join(f"{k} {_cell(v)}" for k, v in item.items() if k not in ("name", "passed"))
            lines.append(f"- check {'passed' if item['passed'] else 'FAILED'}: {item['name']}"
                         + (f" ({details})" if details else ""))
        lines += [f"- note: {note}" for note in section.get("notes", [])]
    return "\n".join(lines) + "\n"


def write(result: dict, output: Path) -> tuple[Path, Path]:
    """Write both files atomically (temporary name, then rename)."""
    output.mkdir(parents=True, exist_ok=True)
    paths = output / "gpu_suite.json", output / "gpu_suite.md"
    for path, text in zip(paths, (json.dumps(result, indent=2, default=str) + "\n", markdown(result)), strict=True):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    return paths
