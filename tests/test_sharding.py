"""Sharded grids over 2 processes (gloo on CPU): the merged head-score file and the NIAH folder equal what one
process writes; a run whose rank 1 dies after its first trial resumes with nothing lost or run twice; the
`accelerate launch` command line with the shipped recipe does the same."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from selective_attention.heads import load_sidecar
from selective_attention.retrieval.needles import resolve_needles
from selective_attention.distributed.sharding import Shard, part_path, part_paths
from tests.conftest import build_tiny, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
GRID = dict(lengths=[64, 96], depths=[0, 50, 100], max_new_tokens=5)
NEEDLES = "sf,violin"  # 2 lengths x 3 depths x 2 needles = 12 trials
DIED = 3  # exit status of the process made to die


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedded_model_dir):
    """A tiny random Llama (float64: no near-ties) saved with the SmolLM2 tokenizer, loadable by every process."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny_shard")
    build_tiny(config, "sdpa", seed=0).double().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_grid(kind: str, model_dir: Path, output: Path, shard: Shard | None = None):
    """The detect or needle grid of these tests, in this process."""
    from selective_attention.loading.loader import load_model
    from selective_attention.retrieval.detect import DetectConfig, detect
    from selective_attention.retrieval.evaluate import NeedleConfig, run_needle_grid

    model, tokenizer = load_model(model_dir, dtype="auto")
    if kind == "detect":
        config = DetectConfig(needles=resolve_needles(NEEDLES), rouge_threshold=-1.0, decode_batch=2, **GRID)
        return detect(model, tokenizer, config, output, model_name="tiny", progress=False, shard=shard)
    config = NeedleConfig(needles=resolve_needles(NEEDLES), mask="0-1,1-3", **GRID)
    return run_needle_grid(model, tokenizer, config, output, model_name="tiny", progress=False, shard=shard)


def _process(rank: int, world: int, port: int, kind: str, model_dir: str, output: str, die: int | None) -> None:
    """One process of a sharded run, set up the way a launcher (torchrun, accelerate launch) sets it up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from selective_attention.distributed import sharding

    if rank == die:  # a hard crash right after this process's first result reached the disk
        module = importlib.import_module(f"selective_attention.retrieval.{'detect' if kind == 'detect' else 'evaluate'}")
        name = "write_part" if kind == "detect" else "_write_json"
        write = getattr(module, name)

        def write_then_die(path, *args, **kwargs):
            write(path, *args, **kwargs)
            if not str(path).endswith("run.json"):
                os._exit(DIED)

        setattr(module, name, write_then_die)
    run_grid(kind, Path(model_dir), Path(output), sharding.current_shard())


def launch(kind: str, model_dir: Path, output: Path, die: int | None = None) -> None:
    mp.spawn(_process, args=(2, free_port(), kind, str(model_dir), str(output), die), nprocs=2, join=True)


def without_timing(records: list[dict]) -> list[dict]:
    drop = {"seconds", "test_duration_seconds", "test_timestamp_utc"}
    return [{k: v for k, v in record.items() if k not in drop} for record in records]


def needle_points(folder: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*_results.json"))}


@pytest.mark.slow  # launches 2-6 processes (20-90 s on the shared 2-core machine)
def test_sharded_detect_equals_one_process_and_survives_a_dead_process(tmp_path, model_dir):
    single = run_grid("detect", model_dir, tmp_path / "single.json")
    assert single.new_trials == 12

    sharded = tmp_path / "sharded.json"
    launch("detect", model_dir, sharded)
    assert sharded.read_text() == (tmp_path / "single.json").read_text()  # the Retrieval_Head lists, byte for byte
    assert without_timing(load_sidecar(sharded)["trials"]) == without_timing(single.meta["trials"])
    assert not part_paths(sharded)

    resumed = tmp_path / "resumed.json"
    with pytest.raises(mp.ProcessExitedException) as died:
        launch("detect", model_dir, resumed, die=1)
    assert died.value.exit_code == DIED
    part = json.loads(part_path(resumed, 1).read_text())
    assert len(part["records"]) == 1  # rank 1 died after one trial
    survivor = part["records"][0]
    launch("detect", model_dir, resumed)
    trials = load_sidecar(resumed)["trials"]
    assert len(trials) == len({t["key"] for t in trials}) == 12  # nothing lost, nothing twice
    assert without_timing(trials) == without_timing(single.meta["trials"])
    assert resumed.read_text() == (tmp_path / "single.json").read_text()
    assert next(t for t in trials if t["key"] == survivor["key"]) == survivor  # kept, not run again
    assert not part_paths(resumed)


@pytest.mark.slow  # launches 2-6 processes (20-90 s on the shared 2-core machine)
def test_sharded_needle_equals_one_process_and_survives_a_dead_process(tmp_path, model_dir):
    run_grid("needle", model_dir, tmp_path / "single")
    single = needle_points(tmp_path / "single")
    assert len(single) == 12

    launch("needle", model_dir, tmp_path / "sharded")
    assert without_timing(list(needle_points(tmp_path / "sharded").values())) == without_timing(list(single.values()))

    with pytest.raises(mp.ProcessExitedException):
        launch("needle", model_dir, tmp_path / "resumed", die=1)
    before = needle_points(tmp_path / "resumed")
    assert 1 <= len(before) < 12
    launch("needle", model_dir, tmp_path / "resumed")
    after = needle_points(tmp_path / "resumed")
    assert without_timing(list(after.values())) == without_timing(list(single.values()))
    assert all(after[name] == point for name, point in before.items())  # points already there were not rerun


@pytest.mark.slow  # launches 2-6 processes (20-90 s on the shared 2-core machine)
def test_accelerate_launch_command_line(tmp_path, model_dir):
    """`accelerate launch --config_file recipes/accelerate/multi_gpu_shard.yaml -m selective_attention.cli detect`
    on 2 CPU processes writes the file the library writes in one process."""
    single = run_grid("detect", model_dir, tmp_path / "single.json")
    output = tmp_path / "cli.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate/multi_gpu_shard.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "selective_attention.cli", "detect",
               "--model", str(model_dir), "--dtype", "auto", "--needles", NEEDLES, "--lengths", "64,96",
               "--depths", "0,50,100", "--max-new-tokens", "5", "--rouge-threshold", "-1", "--decode-batch", "2",
               "--output", str(output)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1 of 2" in done.stderr  # really two processes
    meta = load_sidecar(output)
    assert without_timing(meta["trials"]) == without_timing(single.meta["trials"])
    assert output.read_text() == (tmp_path / "single.json").read_text()


def test_each_process_gets_its_own_gpus(monkeypatch):
    """Placement under a launcher, on a pretend 8-GPU machine: one GPU per process, or a slice per process for
    --device-map auto (max_memory limited to the slice, CPU kept); nothing changes in a single process."""
    import accelerate.utils

    from selective_attention.distributed.sharding import place

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {**{i: 80 * 2**30 for i in range(8)}, "cpu": 2**40})
    eight = Shard(rank=9, world=16, local_rank=1, local_world=8)
    assert place(eight, None, None, None) == {"device": "cuda:1", "device_map": None, "max_memory": None}
    two = Shard(rank=1, world=2, local_rank=1, local_world=2)
    assert two.gpus() == [4, 5, 6, 7]
    placed = place(two, None, "auto", None)
    assert placed["device_map"] == "auto" and sorted(placed["max_memory"], key=str) == [4, 5, 6, 7, "cpu"]
    explicit = {0: "10GiB"}
    assert place(two, None, "auto", explicit)["max_memory"] is explicit  # the user's choice is kept
    assert place(Shard(), None, "auto", None) == {"device": None, "device_map": "auto", "max_memory": None}
    with pytest.raises(ValueError, match="only 8 GPUs"):
        Shard(rank=0, world=16, local_rank=0, local_world=16).gpus()
