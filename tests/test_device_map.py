"""Big-model placement: a tiny model whose layers are split over the CPU and disk offload (accelerate
`device_map`) gives the same detection scores and masked needle answers as the same model in one piece."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from selective_attention.attention.probe import probing
from selective_attention.loading.loader import load_model
from selective_attention.retrieval.batched import decode_batch
from selective_attention.retrieval.detect import DetectConfig, detect, plan
from selective_attention.retrieval.evaluate import NeedleConfig, run_needle_grid
from selective_attention.retrieval.generate import stop_token_ids
from selective_attention.retrieval.needles import resolve_needles
from selective_attention.distributed.placement import check_placement, parse_device_map, parse_max_memory
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel
from tests.conftest import build_tiny, tiny_llama_config

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.norm": "disk", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedded_model_dir):
    """A tiny random Llama (float64, 3 layers) saved with the SmolLM2 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny_split")
    build_tiny(config, "sdpa", seed=0).double().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_split_model_detects_and_masks_like_the_whole_one(tmp_path, model_dir):
    whole, tokenizer = load_model(model_dir, dtype=torch.float64)
    split, _ = load_model(model_dir, dtype=torch.float64, device_map=json.dumps(SPLIT),
                          offload_folder=tmp_path / "offload")
    # really split: layer 1's weights are not in memory, they are read from the offload folder at each call
    assert split.hf_device_map["model.layers.1"] == "disk"
    assert split.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert split.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"

    config = DetectConfig(lengths=[64, 96], depths=[0, 50, 100], needles=resolve_needles("sf"), max_new_tokens=6,
                          rouge_threshold=-1.0, decode_batch=3)
    a = detect(whole, tokenizer, config, tmp_path / "whole.json", model_name="tiny", progress=False)
    b = detect(split, tokenizer, config, tmp_path / "split.json", model_name="tiny", progress=False)
    assert a.new_trials == b.new_trials == 6
    assert (tmp_path / "whole.json").read_text() == (tmp_path / "split.json").read_text()
    assert [(r["key"], r["response_ids"], r["scores"]) for r in a.meta["trials"]] == \
        [(r["key"], r["response_ids"], r["scores"]) for r in b.meta["trials"]]
    # a random model seldom copies the needle, so compare the probe's raw records too: the key every head attends to
    _, prompts = plan(tokenizer, config)
    stop = stop_token_ids(tokenizer, whole)
    records = []
    for model in (whole, split):
        with probing(model) as recorder:
            decoded = decode_batch(model, prompts[:3], stop_ids=stop, max_new_tokens=6, recorder=recorder)
        records.append(torch.cat([d.argmax for d in decoded]))
    assert torch.equal(records[0], records[1])
    assert records[0].unique().numel() > 10  # heads attend to many different keys: not a degenerate comparison

    masked = NeedleConfig(lengths=[64, 96], depths=[0, 100], needles=resolve_needles("sf"), max_new_tokens=6,
                          mask="0-1,1-2,2-0", mask_mode="zero")
    plain = NeedleConfig(lengths=[64, 96], depths=[0, 100], needles=resolve_needles("sf"), max_new_tokens=6)
    whole_masked = run_needle_grid(whole, tokenizer, masked, tmp_path / "whole_masked", model_name="t", progress=False)
    split_masked = run_needle_grid(split, tokenizer, masked, tmp_path / "split_masked", model_name="t", progress=False)
    unmasked = run_needle_grid(whole, tokenizer, plain, tmp_path / "unmasked", model_name="t", progress=False)
    answers = lambda results: [(r["context_length"], r["depth_percent"], r["model_response"]) for r in results]
    assert answers(whole_masked) == answers(split_masked)
    assert answers(whole_masked) != answers(unmasked)  # the mask changes the answers, on the split model too

    # head-wise KV cache: half the KV heads keep sink 4 + window 16 of a 64-96 token context
    headwise = NeedleConfig(lengths=[64, 96], depths=[0, 100], needles=resolve_needles("sf"), max_new_tokens=6,
                            kv_cache="headwise", kv_select="random", full_kv_heads="0.5", sink=4, window=16)
    whole_headwise = run_needle_grid(whole, tokenizer, headwise, tmp_path / "whole_hw", model_name="t", progress=False)
    split_headwise = run_needle_grid(split, tokenizer, headwise, tmp_path / "split_hw", model_name="t", progress=False)
    assert answers(whole_headwise) == answers(split_headwise)
    assert answers(whole_headwise) != answers(unmasked)


@pytest.mark.parametrize("method", ["topk", "bound"])
def test_split_model_runs_the_tree_kernel_like_the_whole_one(tmp_path, model_dir, method):
    whole, tokenizer = load_model(model_dir, dtype=torch.float64)
    split, _ = load_model(model_dir, dtype=torch.float64, device_map=SPLIT, offload_folder=tmp_path / "offload")
    ids = torch.randint(0, len(tokenizer), (1, 80), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (whole, split):
        dense = model(ids).logits
        configure_tree_kernel(model, TreeKernelConfig(method=method, fraction=0.25, leaf_block=4))
        logits.append(model(ids).logits)
        configure_tree_kernel(model, None)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-10)
    assert (logits[0] - dense).abs().max() > 1e-6  # a quarter of the keys: not the dense result


def test_placement_arguments_are_checked_before_loading(tmp_path):
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.0": "0", "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    file = tmp_path / "map.json"
    file.write_text(json.dumps({"model": "disk"}))
    assert parse_device_map(str(file)) == {"model": "disk"}
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory('{"1": "10GiB"}') == {1: "10GiB"}
    with pytest.raises(ValueError, match="expected one of auto"):
        parse_device_map("everywhere")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_device_map("{model: 0}")
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
    with pytest.raises(ValueError, match="exclude each other"):
        check_placement("cuda", "auto", None, None)
    with pytest.raises(ValueError, match="needs --device-map"):
        check_placement(None, None, {0: "1GiB"}, None)
    with pytest.raises(ValueError, match="--offload-folder"):
        check_placement(None, {"model": "disk"}, None, None)
    with pytest.raises(ValueError, match="--offload-folder"):
        load_model("no/such/model", device_map={"model": "disk"})  # refused before looking for the model
