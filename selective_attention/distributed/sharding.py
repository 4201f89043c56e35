"""Trial grids sharded over processes with accelerate (`accelerate launch -m selective_attention.cli ...`).

Every process builds the same grid, reads what is already done, and takes one contiguous chunk of the pending
trials (`PartialState.split_between_processes`). Callers sort the pending trials so that a chunk holds trials
that share a prompt prefix: each process then keeps its shared-prefix KV reuse. A process writes its own results
atomically (`<stem>.part-<rank><suffix>` beside the output, rewritten after every trial); the main process
merges the parts into the usual file after `wait_for_everyone`. Before choosing work the main process folds parts
left by an interrupted run into the merged file, so resuming works per trial whichever process died, with any
number of processes.

Launched without accelerate (one process) nothing here initialises torch.distributed: `Shard.split` returns
everything and `wait` does nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from selective_attention.io import write_json

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Environment variables that a launcher (accelerate, torchrun, MPI) sets for a multi-process run.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class Shard:
    """This process's place in a run: `rank` of `world` processes; `state` is accelerate's `PartialState` (None
    in a single-process run). `local_rank` / `local_world` count the processes of this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def split(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous chunk of `items` (sizes differ by at most one; earlier ranks take the extra)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as chunk:
            return list(chunk)

    def gpus(self) -> list[int]:
        """The CUDA devices this process may use: all of them alone, else an equal contiguous slice per process of
        this machine (8 GPUs, 2 processes: 0-3 and 4-7), so a `--device-map auto` model stays inside its slice."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return []
        if self.local_world <= 1:
            return list(range(count))
        if count < self.local_world:
            raise ValueError(f"{self.local_world} processes on this machine but only {count} GPUs")
        per = count // self.local_world
        return list(range(self.local_rank * per, (self.local_rank + 1) * per))


def launched_world_size() -> int:
    for name in WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 1


def current_shard() -> Shard:
    """The running process's `Shard`; initialises accelerate's `PartialState` only when launched with several
    processes. The processes only meet at barriers (no tensors are exchanged), so the process group is gloo even
    on GPUs, with a timeout long enough for one process to finish its chunk days before the slowest: if one
    process dies, the launcher stops the others."""
    if launched_world_size() <= 1:
        return Shard()
    from accelerate import PartialState

    initialised = bool(PartialState._shared_state)  # e.g. by an Accelerator of the calling script: keep it
    state = PartialState() if initialised else PartialState(cpu=True, timeout=BARRIER_TIMEOUT)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    shard = Shard(state.process_index, state.num_processes, state.local_process_index, local_world, state)
    logger.info("process %d of %d (%s, %s)", shard.rank, shard.world, state.distributed_type, state.device)
    return shard


def place(shard: Shard, device: str | None, device_map: Any, max_memory: dict | None) -> dict:
    """Placement arguments of `load_model` for this process: its own GPU when none is named, or with
    `device_map` auto/balanced its own slice of the GPUs (via `max_memory`) so processes never share a GPU."""
    if not shard.sharded or not torch.cuda.is_available():
        return {"device": device, "device_map": device_map, "max_memory": max_memory}
    gpus = shard.gpus()
    if device is None and device_map is None:
        return {"device": f"cuda:{gpus[0]}", "device_map": None, "max_memory": max_memory}
    if isinstance(device_map, str) and max_memory is None:
        from accelerate.utils import get_max_memory

        available = get_max_memory()
        max_memory = {key: value for key, value in available.items() if key in gpus or not isinstance(key, int)}
    return {"device": device, "device_map": device_map, "max_memory": max_memory}


# --- per-process result files -------------------------------------------------------------------------------------

def part_path(output: str | Path, rank: int) -> Path:
    """head_scores.json -> head_scores.part-3.json"""
    output = Path(output)
    return output.with_name(f"{output.stem}.part-{rank}{output.suffix}")


def part_paths(output: str | Path) -> list[Path]:
    output = Path(output)
    return sorted(output.parent.glob(f"{output.stem}.part-*{output.suffix}"))


def write_part(output: str | Path, rank: int, records: list[dict], meta: dict) -> None:
    """Atomically (re)write this process's part: the run's `meta` and every record it has finished so far."""
    write_json(part_path(output, rank), {"meta": meta, "records": records})


def read_parts(output: str | Path) -> tuple[list[dict], list[dict]]:
    """(records, metas) of every part file beside `output`, in file order."""
    records, metas = [], []
    for path in part_paths(output):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError(f"{path} is not a part file of a sharded run (expected {{'meta', 'records'}})")
        records.extend(data["records"])
        metas.append(data.get("meta") or {})
    return records, metas


def remove_parts(output: str | Path) -> None:
    for path in part_paths(output):
        path.unlink(missing_ok=True)
