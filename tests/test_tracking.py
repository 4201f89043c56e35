"""Experiment tracking: offline tensorboard and wandb runs write what was logged; `none` needs nothing; a missing
backend says how to install it."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import pytest

from selective_attention.loading import quantization
from selective_attention.retrieval import tracking
from selective_attention.retrieval.tracking import (MissingBackendError, TrackingConfig, check_backend, log_trial,
                                                    make_tracker)


@pytest.fixture
def png(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.imshow([[0, 1], [1, 0]])
    path = tmp_path / "grid.png"
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_writes_scalars_image_and_config(tmp_path, png):
    tracker = make_tracker("tensorboard", log_dir=str(tmp_path / "tb"), run_name="en_zh")
    with tracker:
        tracker.log_config({"language": "en", "haystack_language": "zh", "lengths": [500, 1000]})
        for step, recall in enumerate([0.25, 1.0, 0.5]):
            log_trial(tracker, {"rouge1_recall": recall, "depth_percent": 50.0 * step, "counted": recall > 0.5,
                                "response": "text is not logged", "scores": {"3-1": 0.1, "7-2": 0.2}}, step=step)
        tracker.log_image("head_scores", png)
    events = _events(tmp_path / "tb" / "en_zh")
    tags = events.Tags()
    assert {"trial/rouge1_recall", "trial/depth_percent", "trial/counted", "trial/heads_credited"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("trial/rouge1_recall")] == [(0, 0.25), (1, 1.0), (2, 0.5)]
    assert [e.value for e in events.Scalars("trial/counted")] == [0.0, 1.0, 0.0]
    assert [e.value for e in events.Scalars("trial/heads_credited")] == [2.0, 2.0, 2.0]
    assert "head_scores" in tags["images"]
    image = events.Images("head_scores")[0]
    assert image.width == 100 and image.height == 75 and image.encoded_image_string.startswith(b"\x89PNG")
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"haystack_language": "zh"' in text


def test_wandb_offline_run_writes_its_files(tmp_path, png, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional tracking backend")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = make_tracker("wandb", log_dir=str(tmp_path / "wb"), run_name="offline-test", offline=True,
                           project="sa-tests")
    tracker.log_config({"settings": {"language": "zh"}, "quantization": None})
    tracker.log_metrics({"trial/rouge1_recall": 0.75, "trial/response": "skipped"}, step=0)
    tracker.log_image("niah", png, step=1)
    assert tracker.run.config["settings/language"] == "zh"
    run_dir = tracker.run_dir
    tracker.finish()
    assert run_dir.is_relative_to(tmp_path / "wb") and "offline-run" in run_dir.name
    records = list(run_dir.glob("*.wandb"))
    assert records, "offline run database missing"
    assert list((run_dir / "files" / "media" / "images").glob("niah_*.png"))
    assert records[0].stat().st_size > 0  # wandb's offline record log, for `wandb sync`


def test_none_backend_needs_nothing(monkeypatch, tmp_path):
    for name in ("tensorboard", "wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # not importable
    tracker = make_tracker("none")
    with tracker:
        tracker.log_config({"a": 1})
        tracker.log_metrics({"x": 1.0}, step=0)
        tracker.log_image("missing", tmp_path / "no.png")
    check_backend("none")


@pytest.mark.parametrize("backend,package", [("wandb", "wandb"), ("trackio", "trackio"),
                                             ("tensorboard", "tensorboard")])
def test_missing_backend_says_how_to_install(monkeypatch, backend, package):
    real = quantization.package_available
    monkeypatch.setattr(tracking, "package_available", lambda name: False if name == package else real(name))
    with pytest.raises(MissingBackendError, match=f"--report-to {backend} needs {package}.*pip install {package}"):
        make_tracker(backend)
    with pytest.raises(MissingBackendError):
        check_backend(backend)


def test_unknown_backend_and_missing_image(tmp_path):
    with pytest.raises(ValueError, match="unknown --report-to 'mlflow'"):
        TrackingConfig(backend="mlflow")
    with make_tracker("tensorboard", log_dir=str(tmp_path)) as tracker:
        with pytest.raises(FileNotFoundError, match="image"):
            tracker.log_image("x", tmp_path / "absent.png")


def test_numeric_drops_text_and_nan():
    assert tracking.numeric({"a": 1, "b": True, "c": "x", "d": float("nan"), "e": 0.5}) == {"a": 1.0, "b": 1.0,
                                                                                          "e": 0.5}
