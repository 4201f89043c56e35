"""Experiment tracking (`--report-to none|tensorboard|wandb|trackio`) for detection and needle runs.

The backends are accelerate's own trackers (`accelerate.tracking`); fine-tuning reports through
`TrainingArguments.report_to` instead. What they lack is added here: a nested run config (TensorBoard gets it as
JSON text, wandb and trackio as flat "a/b" keys), images read from the PNG files a run wrote, one needle or
detection trial as scalars, and the CLI flags. Every backend writes locally when asked to: tensorboard always
does, wandb with `WANDB_MODE=offline` (set for you when `offline=True`), trackio into `TRACKIO_DIR`. `none`
imports nothing and needs no network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selective_attention.loading.quantization import MissingBackendError, package_available

logger = logging.getLogger(__name__)

#: Backend name -> the package it needs (None: nothing).
BACKENDS: dict[str, str | None] = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


@dataclass
class TrackingConfig:
    """Where and how to report. `log_dir` defaults to `runs/` (tensorboard), wandb's and trackio's own defaults."""

    backend: str = "none"
    project: str = "selective-attention"
    run_name: str | None = None
    log_dir: str | None = None
    offline: bool = False
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown --report-to {self.backend!r}; expected one of {', '.join(BACKENDS)}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as "a/b" keys (for backends that want flat configs)."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The entries that are numbers (bools as 0/1), for scalar logging."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and value == value:  # drops NaN
            out[key] = float(value)
    return out


def _read_image(path: str | Path):
    """(height, width, 3) uint8 array of a PNG."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _start_backend(config: TrackingConfig):
    """accelerate's tracker for `config.backend`, started (None for `none`)."""
    if config.backend == "none":
        return None
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    if config.backend == "tensorboard":
        tracker = TensorBoardTracker(config.run_name or "", config.log_dir or "runs")
    elif config.backend == "wandb":
        if config.offline:
            os.environ["WANDB_MODE"] = "offline"
        kwargs: dict[str, Any] = dict(name=config.run_name, tags=config.tags or None, reinit="finish_previous")
        if config.log_dir:
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(config.log_dir)
        tracker = WandBTracker(config.project, **kwargs)  # accelerate passes its run_name as wandb's project
    else:
        if config.log_dir:  # trackio reads its storage folder from the environment when imported
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TRACKIO_DIR"] = str(Path(config.log_dir).resolve())
        tracker = TrackioTracker(config.project, name=config.run_name)
    tracker.start()
    return tracker


class Tracker:
    """One run on one backend: accelerate's tracker (`backend`, None for `none`) plus what it lacks."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.backend = _start_backend(config)

    @property
    def run(self) -> Any:
        """The backend's own run object (wandb/trackio run, TensorBoard SummaryWriter)."""
        return None if self.backend is None else self.backend.tracker

    @property
    def run_dir(self) -> Path:
        """wandb: the run's local folder (offline runs are synced from it)."""
        return Path(self.run.dir).parent

    def log_config(self, config: dict) -> None:
        """The run's settings (model, grid, languages, quantization...); nested values allowed."""
        if self.backend is None:
            return
        if self.config.backend == "tensorboard":  # TensorBoard's hparams take flat scalars only
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.backend.log({"config": "```json\n" + text + "\n```"}, step=0)
        else:
            self.backend.store_init_configuration(_flatten(json.loads(json.dumps(config, default=str))))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Scalars at `step` (one step per needle trial); text and NaN are dropped."""
        if self.backend is not None:
            self.backend.log(numeric(metrics), step=step)

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        """A PNG written by the run (e.g. the needle grid heatmap)."""
        if self.backend is None:
            return
        image = _read_image(path)
        if self.config.backend == "tensorboard":
            self.backend.log_images({tag: image[None]}, step=0 if step is None else step, dataformats="NHWC")
        elif self.config.backend == "wandb":
            self.backend.log_images({tag: [image]}, step=step)
        else:  # accelerate's trackio tracker has no log_images
            import trackio

            self.backend.log({tag: trackio.Image(str(path))}, step=step)

    def finish(self) -> None:
        """Flush and close."""
        if self.backend is not None:
            self.backend.finish()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def check_backend(name: str) -> None:
    """Fail fast (before a model loads) when `--report-to` names an unknown or uninstalled backend."""
    name = TrackingConfig(backend=name or "none").backend
    package = BACKENDS[name]
    if package and not package_available(package):
        raise MissingBackendError(f"--report-to {name} needs {package}, which is not installed: pip install {package}")


def make_tracker(backend: str | TrackingConfig = "none", **kwargs) -> Tracker:
    """A tracker for `backend` (or a full `TrackingConfig`); raises MissingBackendError with the pip hint when its
    package is absent."""
    config = backend if isinstance(backend, TrackingConfig) else TrackingConfig(backend=backend, **kwargs)
    check_backend(config.backend)
    tracker = Tracker(config)
    logger.info("reporting to %s%s", config.backend, f" ({config.log_dir})" if config.log_dir else "")
    return tracker


def add_tracking_arguments(parser) -> None:
    """`--report-to`, `--tracking-dir`, `--run-name`, `--project` for a CLI command."""
    group = parser.add_argument_group("experiment tracking")
    group.add_argument("--report-to", default="none", choices=sorted(BACKENDS),
                       help="log config, per-trial scores and plots to this backend (default: none)")
    group.add_argument("--tracking-dir", default=None,
                       help="local folder for the tracker's files (tensorboard logdir, wandb dir, TRACKIO_DIR)")
    group.add_argument("--run-name", default=None, help="run name in the tracker")
    group.add_argument("--project", default="selective-attention", help="project name (wandb, trackio)")
    group.add_argument("--offline", action="store_true", help="wandb: WANDB_MODE=offline (sync later)")


def tracker_from_args(args) -> Tracker:
    return make_tracker(TrackingConfig(backend=getattr(args, "report_to", "none") or "none",
                                       project=getattr(args, "project", "selective-attention"),
                                       run_name=getattr(args, "run_name", None),
                                       log_dir=getattr(args, "tracking_dir", None),
                                       offline=bool(getattr(args, "offline", False))))


def log_trial(tracker: Tracker, record: dict, step: int, prefix: str = "trial") -> None:
    """One needle / detection trial as scalars: its numeric fields plus how many heads it credited."""
    values = {f"{prefix}/{key}": value for key, value in record.items()
              if key in ("rouge1_recall", "score", "counted", "context_length", "context_length_requested",
                         "depth_percent", "actual_depth", "seconds", "prompt_tokens")}
    if isinstance(record.get("scores"), dict):
        values[f"{prefix}/heads_credited"] = len(record["scores"])
    tracker.log_metrics(values, step=step)
