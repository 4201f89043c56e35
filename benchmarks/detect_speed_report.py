"""Markdown tables of `benchmarks/detect_speed.py`'s JSON report (one function, no measuring here)."""

from __future__ import annotations


def _yes(value) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def markdown(report: dict) -> str:
    lines = ["# Retrieval-head detection: floor, probe, reference, memory, sharding", "",
             f"Model {report['model']}, max {report['max_new_tokens']} new tokens, torch threads {report['threads']}, "
             f"{report['machine']}.", ""]
    commands: dict[str, list[str]] = {}
    for section, command in report.get("commands", {}).items():
        commands.setdefault(command, []).append(section)
    lines += [f"- {', '.join(sections)}: `{command}`" for command, sections in commands.items()] + [""]
    speed = report.get("speed")
    if speed:
        lines += [f"## Speed: {speed['trials']} trials (lengths {speed['lengths']}, depths {speed['depths']}, needles "
                  f"{speed['needles']}), {speed['generated_tokens']} generated tokens, fastest of {speed['repeats']} "
                  "interleaved runs", "",
                  "The floor is the grid's forward passes with no probe: the shared prefix once, each trial's "
                  "unshared suffix once, its greedy answer at SDPA decode speed (one trial at a time, as specified; "
                  "the batched floor decodes trials of one prompt length together, as the shipped probe does).", "",
                  "CPU seconds (the process's own) are the steadier measure on a shared machine; "
                  "wall seconds include waiting for a core.", "",
                  "| method | CPU seconds | CPU ratio to floor | wall seconds | wall ratio to floor | identical answers "
                  "| identical scores |",
                  "|---|---:|---:|---:|---:|:---:|:---:|"]
        for name, row in speed["rows"].items():
            lines.append(f"| {name} | {row['cpu_seconds']} | {row['cpu_ratio_to_floor']}x | {row['seconds']} | "
                         f"{row['ratio_to_floor']}x | "
                         f"{_yes(row['answers_identical_to_reference'])} | "
                         f"{_yes(row['scores_identical_to_reference'])} |")
        lines.append("")
    memory = report.get("memory")
    if memory:
        lines += ["## Peak memory of one detection trial (depth 50) vs context length", "",
                  "Above the loaded model; the KV cache column is the cache of one prompt, for scale. Per 1K tokens: "
                  "the above-model peak divided by the prompt length in thousands (flat means O(L)).", "",
                  "| context | prompt tokens | KV cache (MiB) | probe above model (MiB) | probe per 1K tokens | "
                  "reference above model (MiB) | reference per 1K tokens | reference / probe |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for length, rows in memory.items():
            probe, reference = rows.get("probe"), rows.get("reference")
            base = probe or reference
            per = lambda row: f"{1000 * row['above_model_mib'] / row['prompt_tokens']:.1f}" if row else "-"  # noqa: E731
            above = lambda row: f"{row['above_model_mib']:.0f}" if row else "-"  # noqa: E731
            ratio = (f"{reference['above_model_mib'] / probe['above_model_mib']:.1f}x" if probe and reference
                     else "-")
            lines.append(f"| {length} | {base['prompt_tokens']} | {base['kv_cache_mib']:.0f} | {above(probe)} | "
                         f"{per(probe)} | {above(reference)} | {per(reference)} | {ratio} |")
        lines += ["", f"Memory measured as {base['memory']}.", ""]
    shard = report.get("shard")
    if shard:
        first = shard["runs"][0]["seconds"]
        lines += [f"## Sharded `detect` (lengths {shard['lengths']}): wall time by processes x threads", "",
                  "Whole command: process start, model load, grid, merge. Head-score files identical: "
                  f"{_yes(shard['identical_files'])}.", "",
                  "| processes | torch threads each | seconds | speed-up vs 1 x 1 |", "|---:|---:|---:|---:|"]
        for row in shard["runs"]:
            lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['seconds']} | "
                         f"{first / row['seconds']:.2f}x |")
        lines.append("")
    return "\n".join(lines)
