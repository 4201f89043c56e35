"""Where a model's weights go: `device_map` / `max_memory` / `offload_folder` for accelerate's big-model inference.

A model too large for one device is loaded with `from_pretrained(device_map=...)`: accelerate splits its modules
over GPUs, the CPU and disk, and moves activations between them. Our attention functions create every tensor on
the device of the query or key they receive, so probes, masks, head-wise caches and the tree kernel work on any
split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: accelerate's placement strategies (`from_pretrained(device_map=...)`).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """A strategy name, a JSON object `{"module.name": device}` or the path of a JSON file holding one."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if text.startswith("{"):
        data, source = _loads(text, "--device-map"), "--device-map"
    elif Path(text).is_file():
        data, source = _loads(Path(text).read_text(encoding="utf-8"), text), text
    else:
        raise ValueError(f"--device-map {text!r}: expected one of {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                         "or a JSON file")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: a device map is a non-empty JSON object {{'module.name': device}}")
    return {str(name): _device(value, source) for name, value in data.items()}


def parse_max_memory(text: str | dict | None) -> dict | None:
    """`0=20GiB,1=20GiB,cpu=64GiB` or a JSON object; GPU indices become ints, as accelerate expects."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if text.startswith("{"):
        pairs = list(_loads(text, "--max-memory").items())
    else:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs) or not pairs:
            raise ValueError(f"--max-memory {text!r}: expected 'DEVICE=SIZE,...' such as '0=20GiB,cpu=64GiB'")
    return {_device(key, "--max-memory"): str(value).strip() for key, value in pairs}


def check_placement(device: str | None, device_map: Any, max_memory: dict | None,
                    offload_folder: str | Path | None) -> None:
    """Refuse combinations `from_pretrained` would reject late (or silently ignore)."""
    if device_map is not None and device:
        raise ValueError("--device and --device-map exclude each other: name devices inside the device map")
    if max_memory is not None and device_map is None:
        raise ValueError("--max-memory needs --device-map (auto, balanced, ...)")
    uses_disk = (isinstance(device_map, dict) and "disk" in device_map.values()) or (
        max_memory is not None and "disk" in max_memory)
    if uses_disk and offload_folder is None:
        raise ValueError("the device map offloads to disk: give --offload-folder DIR")


def _loads(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from None


def _device(value: Any, source: str) -> int | str:
    """0 / "0" -> 0; "cuda:1", "cpu", "disk", "mps" stay strings."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{source}: {value!r} is not a device (a GPU index, 'cuda:N', 'cpu' or 'disk')")
