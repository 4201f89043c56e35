"""Retrieval-head detection against its compute floor, its memory against context length, and sharded wall time.

Three sections, each in its own subprocesses, written to benchmarks/results/detect_speed.{json,md}:

- **speed** (one process, variants interleaved `--repeats` times, fastest run kept): the *floor* is the same
  forward passes with no probe (the shared prefix once, each trial's unshared suffix once, its greedy answer at
  SDPA decode speed, one trial at a time); the floor with trials of one prompt length decoded as a batch; the probe
  one trial at a time; the probe as shipped (batched decode). The reference loop (eager, `output_attentions=True`,
  full prefill per trial) runs in its own process. Ratios are to the floor; scores and answers are compared with
  the reference's.
- **memory**: one trial (depth 50) per context length and method, each in a fresh process; peak memory of
  `detect` above the loaded model (peak RSS reset after loading on CPU, `max_memory_allocated` on CUDA), with
  the KV cache's own size for scale.
- **shard**: the `detect` command on a grid with 1 process and with `accelerate launch` on N processes (wall time
  including process start and model load; identical head-score files).

    python benchmarks/detect_speed.py                       # 2 lengths x 5 depths x 2 needles at 1K-2K tokens
    python benchmarks/detect_speed.py --sections memory --memory-lengths 1000,2000,4000,8000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SPEED_VARIANTS = ("floor", "floor (batched decode)", "probe (one trial at a time)", "probe")


def _setup(args):
    import torch

    from selective_attention.loading.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device)


def _config(args, **overrides):
    from selective_attention.retrieval.detect import DetectConfig
    from selective_attention.retrieval.needles import resolve_needles

    settings = dict(lengths=args.lengths, depths=args.depths, needles=resolve_needles(args.needles),
                    max_new_tokens=args.max_new_tokens, chat=None if args.chat is None else args.chat == "on")
    return DetectConfig(**{**settings, **overrides})


def floor(model, tokenizer, config, batch: int) -> dict[str, list[int]]:
    """The grid's forward passes with no probe: prefix once, each suffix once, greedy answers (plain SDPA)."""
    from selective_attention.retrieval.batched import batch_groups, decode_batch
    from selective_attention.retrieval.detect import plan, reuse_order, trial_key
    from selective_attention.retrieval.generate import SharedPrefix, greedy_decode, stop_token_ids

    _, prompts = plan(tokenizer, config)
    prompts = reuse_order(prompts)
    stop = stop_token_ids(tokenizer, model)
    shared = SharedPrefix(model, prompts)
    answers = {}
    for group in batch_groups(prompts, batch):
        if batch == 1:
            cache, cached = shared.start(group[0])
            decoded = [greedy_decode(model, group[0].input_ids, stop_ids=stop, max_new_tokens=config.max_new_tokens,
                                     cache=cache, cached_length=cached)]
        else:
            decoded = decode_batch(model, group, stop_ids=stop, max_new_tokens=config.max_new_tokens, shared=shared)
        for prompt, answer in zip(group, decoded):
            answers[trial_key(prompt.requested_length, prompt.depth_percent, prompt.needle)] = answer.tokens
    return answers


def speed_worker(args) -> dict:
    from selective_attention.heads import load_sidecar
    from selective_attention.retrieval.detect import detect

    model, tokenizer = _setup(args)
    config = _config(args)
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    outputs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = SPEED_VARIANTS if repeat % 2 == 0 else SPEED_VARIANTS[::-1]  # no variant always first
            for name in order:
                output = Path(tmp) / f"{name.replace(' ', '_')}-{repeat}.json"
                start, cpu = time.perf_counter(), time.process_time()
                if name.startswith("floor"):
                    answers = floor(model, tokenizer, config, batch=8 if "batched" in name else 1)
                else:
                    detect(model, tokenizer, replace(config, decode_batch=1 if "one trial" in name else 8), output,
                           model_name="benchmark", progress=False)
                    answers = {r["key"]: r["response_ids"] for r in load_sidecar(output)["trials"]}
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                best[name] = min(best.get(name, float("inf")), seconds)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
                outputs[name] = {"answers": answers,
                                 "scores": json.loads(output.read_text()) if output.exists() else None}
                print(f"  {name}: {seconds:.1f}s ({cpu:.1f}s CPU)", file=sys.stderr, flush=True)
    return {"seconds": best, "cpu_seconds": best_cpu, "outputs": outputs,
            "generated_tokens": sum(len(t) for t in outputs["probe"]["answers"].values())}


def reference_worker(args) -> dict:
    from selective_attention.retrieval.detect import detect

    model, tokenizer = _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "reference.json"
        start, cpu = time.perf_counter(), time.process_time()
        result = detect(model, tokenizer, _config(args, method="reference"), output, model_name="benchmark",
                        progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"seconds": seconds, "cpu_seconds": cpu, "scores": json.loads(output.read_text()),
                "answers": {r["key"]: r["response_ids"] for r in result.meta["trials"]}}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def memory_worker(args) -> dict:
    import torch

    from selective_attention.modeling import text_config
    from selective_attention.retrieval.detect import detect

    model, tokenizer = _setup(args)
    config = _config(args, lengths=[args.length], depths=[50.0], method=args.method,
                     needles=_config(args).needles[:1])
    with torch.inference_mode():  # touch every weight first: a loaded checkpoint may still be paged in lazily
        model(input_ids=torch.tensor([tokenizer("warm up")["input_ids"]], device=model.device))
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    result = detect(model, tokenizer, config, None, model_name="benchmark", progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib("VmHWM")
    text = text_config(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    prompt = result.meta["trials"][0]["prompt_tokens"]
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * prompt * model.dtype.itemsize / 2**20
    return {"prompt_tokens": prompt, "model_mib": base, "peak_mib": peak, "above_model_mib": peak - base,
            "kv_cache_mib": kv, "memory": "cuda allocated" if cuda else "process RSS"}


def _run_worker(args, worker: str, *extra: str) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--lengths", args.raw_lengths, "--depths", args.raw_depths,
               "--needles", args.needles, "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
               "--repeats", str(args.repeats), *extra]
    command += ["--model", args.model] if args.model else []
    command += ["--device", args.device] if args.device else []
    command += ["--chat", args.chat] if args.chat else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{worker} {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_section(args) -> dict:
    """The detect command with 1 process (1 thread, then every core) and with `accelerate launch` on N processes
    (cores / N threads each): wall time and identical head-score files."""
    cores = os.cpu_count() or 1
    runs = [(1, 1), (1, cores), (args.shard_processes, max(1, cores // args.shard_processes))]
    rows, files = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, threads in runs:
            output = Path(tmp) / f"p{processes}-t{threads}.json"
            cli = ["-m", "selective_attention.cli", "--log-level", "WARNING", "detect", "--lengths", args.shard_lengths,
                   "--depths", args.raw_depths, "--needles", args.needles, "--max-new-tokens",
                   str(args.max_new_tokens), "--output", str(output)]
            cli += ["--model", args.model] if args.model else []
            launcher = [sys.executable] if processes == 1 else [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "recipes/accelerate/multi_gpu_shard.yaml"), "--num_processes", str(processes)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            start = time.perf_counter()
            done = subprocess.run(launcher + cli, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"detect with {processes} processes failed:\n{done.stderr[-3000:]}")
            rows.append({"processes": processes, "threads_per_process": threads,
                         "seconds": round(time.perf_counter() - start, 1)})
            files.append(output.read_text())
            print(f"  {processes} x {threads} threads: {rows[-1]['seconds']}s", file=sys.stderr, flush=True)
    return {"lengths": args.shard_lengths, "runs": rows, "identical_files": len(set(files)) == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--lengths", default="1000,2000")
    parser.add_argument("--depths", default="0:100:25")
    parser.add_argument("--needles", default="sf,violin")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="speed: runs of each variant (fastest kept)")
    parser.add_argument("--memory-lengths", default="1000,2000,4000,8000")
    parser.add_argument("--shard-lengths", default="1000", help="shard: context lengths of the sharded grid")
    parser.add_argument("--shard-processes", type=int, default=2)
    parser.add_argument("--sections", default="speed,memory,shard")
    parser.add_argument("--output", default="detect_speed", help="result file stem under benchmarks/results/")
    parser.add_argument("--chat", default=None, choices=("on", "off"), help="chat template (default: the model's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="probe", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from selective_attention.retrieval.config import parse_numbers

    args.raw_lengths, args.raw_depths = args.lengths, args.depths
    args.lengths, args.depths = parse_numbers(args.lengths, int), parse_numbers(args.depths)
    if args.worker:
        workers = {"speed": speed_worker, "reference": reference_worker, "memory": memory_worker}
        print(json.dumps(workers[args.worker](args)))
        return
    report = _load_previous(args.output)
    report.update(model=args.model or "SmolLM2-135M-Instruct (embedded)", threads=args.threads or "default",
                  machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  max_new_tokens=args.max_new_tokens)
    sections = args.sections.split(",")
    if "speed" in sections:
        print("speed: floor and probe variants ...", file=sys.stderr, flush=True)
        speed = _run_worker(args, "speed")
        print("speed: reference ...", file=sys.stderr, flush=True)
        reference = _run_worker(args, "reference")
        report["speed"] = _speed_rows(args, speed, reference)
    if "memory" in sections:
        report["memory"] = {}
        for length in parse_numbers(args.memory_lengths, int):
            for method in ("probe", "reference"):
                print(f"memory: {method} at {length} ...", file=sys.stderr, flush=True)
                row = _run_worker(args, "memory", "--method", method, "--length", str(length))
                report["memory"].setdefault(str(length), {})[method] = {k: round(v, 1) if isinstance(v, float) else v
                                                                       for k, v in row.items()}
    if "shard" in sections:
        print("shard: 1 vs N processes ...", file=sys.stderr, flush=True)
        report["shard"] = shard_section(args)
    report.setdefault("commands", {}).update({s: "python benchmarks/detect_speed.py " + " ".join(sys.argv[1:])
                                              for s in sections})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2) + "\n")
    from detect_speed_report import markdown

    text = markdown(report)
    (RESULTS / f"{args.output}.md").write_text(text)
    print(text)


def _load_previous(output: str) -> dict:
    """Sections not rerun keep their last numbers (each section names its own command)."""
    path = RESULTS / f"{output}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    return previous if "speed" in previous or "memory" in previous else {}


def _speed_rows(args, speed: dict, reference: dict) -> dict:
    rows = {}
    for name in (*SPEED_VARIANTS, "reference"):
        seconds = reference["seconds"] if name == "reference" else speed["seconds"][name]
        cpu = reference["cpu_seconds"] if name == "reference" else speed["cpu_seconds"][name]
        out = reference if name == "reference" else speed["outputs"][name]
        rows[name] = {"seconds": round(seconds, 2), "ratio_to_floor": round(seconds / speed["seconds"]["floor"], 3),
                      "cpu_seconds": round(cpu, 2),
                      "cpu_ratio_to_floor": round(cpu / speed["cpu_seconds"]["floor"], 3),
                      "answers_identical_to_reference": out["answers"] == reference["answers"],
                      "scores_identical_to_reference": None if out.get("scores") is None
                      else out["scores"] == reference["scores"]}
    return {"lengths": args.lengths, "depths": args.depths, "needles": args.needles, "repeats": args.repeats,
            "trials": len(reference["answers"]), "generated_tokens": speed["generated_tokens"], "rows": rows}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
