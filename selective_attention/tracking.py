"""Experiment tracking (`--report-to none|tensorboard|wandb|trackio`) for detection, needle and recipe runs.

The Retrieval_Head reference logs its masking runs to wandb (`--wandb`); here any of several backends, chosen by
name, receives the run config, per-point scores (one step per needle trial) and images (the grid heatmap). Every
backend writes locally when asked to: tensorboard always does, wandb with `WANDB_MODE=offline` (set for you when
`offline=True`), trackio into `TRACKIO_DIR`. `none` imports nothing and needs no network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .quantization import MissingBackendError, package_available

logger = logging.getLogger(__name__)


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
        if self.backend not in TRACKERS:
            raise ValueError(f"unknown --report-to {self.backend!r}; expected one of {', '.join(TRACKERS)}")


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


class Tracker:
    """The `none` backend and the interface of the others."""

    name = "none"
    package: str | None = None
    distribution: str | None = None

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config

    @classmethod
    def check(cls) -> None:
        if cls.package and not package_available(cls.package):
            raise MissingBackendError(f"--report-to {cls.name} needs {cls.distribution}, which is not installed: "
                                      f"pip install {cls.distribution}")

    def log_config(self, config: dict) -> None:
        """The run's settings (model, grid, languages, quantization...)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Scalars at `step` (one step per needle trial)."""

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        """A PNG written by the run (e.g. the needle grid heatmap)."""

    def finish(self) -> None:
        """Flush and close."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def _read_image(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    package = "tensorboard"
    distribution = "tensorboard"

    def __init__(self, config: TrackingConfig) -> None:
        super().__init__(config)
        from torch.utils.tensorboard import SummaryWriter

        root = Path(config.log_dir or "runs")
        self.log_dir = root / config.run_name if config.run_name else root
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._step = 0

    def _next(self, step: int | None) -> int:
        if step is None:
            step, self._step = self._step, self._step + 1
        return step

    def log_config(self, config: dict) -> None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "```json\n" + text + "\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self._next(step)
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        self.writer.add_image(tag, _read_image(path), 0 if step is None else step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"
    package = "wandb"
    distribution = "wandb"

    def __init__(self, config: TrackingConfig) -> None:
        super().__init__(config)
        if config.offline:
            os.environ["WANDB_MODE"] = "offline"
        import wandb

        self.wandb = wandb
        kwargs: dict[str, Any] = dict(project=config.project, name=config.run_name, tags=config.tags or None,
                                      reinit="finish_previous")
        if config.log_dir:
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(config.log_dir)
        self.run = wandb.init(**kwargs)

    def log_config(self, config: dict) -> None:
        self.run.config.update(_flatten(json.loads(json.dumps(config, default=str))), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(numeric(metrics), step=step)

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).parent

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    name = "trackio"
    package = "trackio"
    distribution = "trackio"

    def __init__(self, config: TrackingConfig) -> None:
        super().__init__(config)
        if config.log_dir:  # trackio reads its storage folder from the environment when imported
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TRACKIO_DIR"] = str(Path(config.log_dir).resolve())
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=config.project, name=config.run_name)
        self._config: dict = {}

    def log_config(self, config: dict) -> None:
        self._config.update(_flatten(json.loads(json.dumps(config, default=str))))
        try:
            self.run.config.update(self._config)
        except AttributeError:  # older trackio: config only at init
            logger.debug("trackio run has no mutable config; config logged as text")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.trackio.log(numeric(metrics), step=step)

    def log_image(self, tag: str, path: str | Path, step: int | None = None) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        self.trackio.log({tag: self.trackio.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.trackio.finish()


TRACKERS: dict[str, type[Tracker]] = {}


def register_tracker(cls: type[Tracker]) -> type[Tracker]:
    """Add a backend (a `Tracker` subclass with a unique `name`)."""
    TRACKERS[cls.name] = cls
    return cls


for _cls in (Tracker, TensorBoardTracker, WandbTracker, TrackioTracker):
    register_tracker(_cls)


def make_tracker(backend: str | TrackingConfig = "none", **kwargs) -> Tracker:
    """A tracker for `backend` (or a full `TrackingConfig`); raises MissingBackendError with the pip hint when its
    package is absent."""
    config = backend if isinstance(backend, TrackingConfig) else TrackingConfig(backend=backend, **kwargs)
    cls = TRACKERS[config.backend]
    cls.check()
    tracker = cls(config)
    logger.info("reporting to %s%s", config.backend, f" ({config.log_dir})" if config.log_dir else "")
    return tracker


def add_tracking_arguments(parser) -> None:
    """`--report-to`, `--tracking-dir`, `--run-name`, `--project` for a CLI command."""
    group = parser.add_argument_group("experiment tracking")
    group.add_argument("--report-to", default="none", choices=sorted(TRACKERS),
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


def settings_dict(obj: Any) -> dict:
    """A dataclass config (or dict) as plain JSON-able data."""
    if hasattr(obj, "settings"):
        return obj.settings()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return dict(obj)


def check_backend(name: str) -> None:
    """Fail fast (before a model loads) when `--report-to` names an unknown or uninstalled backend."""
    TrackingConfig(backend=name or "none")
    TRACKERS[name or "none"].check()
