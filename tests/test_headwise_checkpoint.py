"""Head-wise KV pattern in a converted `selective_llama` checkpoint: generate uses the head-wise cache without the
plugin (fresh process, selective_attention blocked), and the card states the kept fraction."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from selective_attention.cache import HeadwisePolicy, headwise_cache
from selective_attention.cache.checkpoint import (
    checkpoint_pattern,
    headwise_request,
    kept_fraction,
)
from selective_attention.gqa.hub import build_model_card
from selective_attention.modeling import cache_kwargs
from selective_attention.gqa.convert import convert_model

from .conftest import build_tiny, tiny_llama_config

SCORES = {"0-1": [0.9], "1-2": [0.5], "1-3": [0.4]}  # KV head 0 of layer 0, KV head 1 of layer 1
GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

GENERATE_WITHOUT_PLUGIN = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "selective_attention":
                raise ModuleNotFoundError(f"blocked {name}")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    out = model.generate(torch.tensor(json.loads(sys.argv[2])), max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    torch.save({"sequences": out.sequences, "logits": torch.stack(out.logits),
                "layers": [type(layer).__name__ for layer in cache.layers],
                "kept": [layer.stream_keys.shape[-2] for layer in cache.layers if hasattr(layer, "stream_keys")]},
               sys.argv[3])
    assert not any(name.startswith("selective_attention") for name in sys.modules)
""")


def _generate_without_plugin(checkpoint, ids, tmp_path) -> dict:
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_WITHOUT_PLUGIN)
    out = tmp_path / "generated.pt"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-I", str(script), str(checkpoint), json.dumps(ids.tolist()), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_checkpoint_generates_through_its_headwise_cache_without_plugin(tmp_path):
    source = build_tiny(tiny_llama_config(max_position_embeddings=64))
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    request = dict(scores=SCORES, full=2, sink=2, window=6)
    convert_model(source, "2", out_dir=tmp_path / "ckpt", headwise=request)
    settings = json.loads((tmp_path / "ckpt" / "config.json").read_text())["sa_headwise"]
    assert settings == {"pattern": [[1, 0], [0, 1]], "sink": 2, "window": 6}
    assert {"headwise_attention_selective_llama.py", "headwise_cache_selective_llama.py"} <= {
        path.name for path in (tmp_path / "ckpt").iterdir()}
    fresh = _generate_without_plugin(tmp_path / "ckpt", ids, tmp_path)
    assert fresh["layers"] == ["HeadwiseLayer", "HeadwiseLayer"] and fresh["kept"] == [2 + 6, 2 + 6]
    # the same policy through the plugin on the source Llama (the kernel itself is checked by hand elsewhere)
    with headwise_cache(source, policy=HeadwisePolicy(settings["pattern"], sink=2, window=6)) as cache:
        with torch.no_grad():
            plugin = source.generate(ids, **cache_kwargs(cache), **GENERATE)
    assert torch.equal(fresh["sequences"], plugin.sequences)
    torch.testing.assert_close(fresh["logits"], torch.stack(plugin.logits), atol=1e-5, rtol=0)
    card = str(build_model_card(tmp_path / "ckpt"))
    assert "head-wise KV cache: 2/4 KV heads keep every position" in card
    assert f"{100 * kept_fraction(settings, 64):.1f}% of the KV positions at 64 tokens" in card


def test_window_covering_the_context_generates_as_the_source(tmp_path):
    source = build_tiny(tiny_llama_config(max_position_embeddings=64))
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    model, _ = convert_model(source, "2", headwise=dict(scores=None, full=0, sink=0, window=40))
    assert model.config.sa_headwise["pattern"] == [[0, 0], [0, 0]]
    with torch.no_grad():
        ours, theirs = model.generate(ids, **GENERATE), source.generate(ids, **GENERATE)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), atol=1e-5, rtol=0)


def test_pattern_follows_the_converted_layout():
    request = headwise_request(SCORES, full=1, num_layers=2, num_heads=4, sink=2, window=6)
    # layer 0 reduced to one KV head (all query heads on it), layer 1 kept at two; layer 1 slides: stays full
    pattern = checkpoint_pattern(request, [[0, 0, 0, 0], [0, 0, 1, 1]], [1, 2], windows=[None, 8])["pattern"]
    assert pattern == [[1], [1, 1]]
    pattern = checkpoint_pattern({**request, "full": 0}, [[0, 1, 0, 1], [0, 0, 1, 1]], [2, 2])["pattern"]
    assert pattern == [[1, 1], [0, 0]]  # a non-contiguous layer keeps its heads full


@pytest.mark.parametrize("request_settings, message", [
    (dict(full=1.5), r"must lie in \(0, 1\]"), (dict(sink=60, window=10), "exceeds the model's context of 64"),
    (dict(full=1), "needs head scores"), (dict(full=1, method="best"), "unknown selection method")])
def test_bad_headwise_request_refused_before_conversion(request_settings, message):
    source = build_tiny(tiny_llama_config(max_position_embeddings=64))
    with pytest.raises(ValueError, match=message):
        convert_model(source, "2", headwise={"scores": None, "sink": 2, "window": 6, **request_settings})


def test_cli_convert_headwise(tmp_path):
    from selective_attention.cli import main

    build_tiny(tiny_llama_config(max_position_embeddings=64)).save_pretrained(tmp_path / "tiny")
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(SCORES))
    assert main(["convert", "--model", str(tmp_path / "tiny"), "--kv-heads", "2", "--out", str(tmp_path / "out"),
                 "--headwise-full", "0.5", "--head-scores", str(scores), "--sink", "2", "--window", "6"]) == 0
    settings = json.loads((tmp_path / "out" / "config.json").read_text())["sa_headwise"]
    assert settings == {"pattern": [[1, 0], [0, 1]], "sink": 2, "window": 6}
    assert main(["convert", "--model", str(tmp_path / "tiny"), "--kv-heads", "2", "--out", str(tmp_path / "bad"),
                 "--headwise-full", "0.5", "--sink", "2", "--window", "6"]) == 2  # no scores: refused
    assert not (tmp_path / "bad").exists()
