"""The KV-head converter: exactness of duplicate, error of mean/similarity, bad input, atomic output, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from selective_attention.cli import main
from selective_attention.modeling import output_cache
from selective_attention.gqa.convert import convert_model, contiguous_partition, parse_kv_heads

from .conftest import build_tiny, tiny_llama_config
from .test_gqa import load_in_fresh_process

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 23, 64, 7, 11, 2, 90, 31, 77, 14, 6]])
CALIBRATION = torch.randint(1, 128, (1, 96), generator=torch.Generator().manual_seed(1))


def tiny_source(kv_heads=4, heads=4, layers=3, seed=0):
    return build_tiny(tiny_llama_config(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=8 * heads,
                                        num_hidden_layers=layers), seed=seed)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_parse_kv_heads():
    assert parse_kv_heads("9", [3] * 4) == [9] * 4
    assert parse_kv_heads("1,2,3,3", [3] * 4) == [1, 2, 3, 3]
    assert parse_kv_heads("3:9,0:1", [3] * 4) == [1, 3, 3, 9]
    assert parse_kv_heads("all:1,-1:3", [3] * 4) == [1, 1, 1, 3]
    assert parse_kv_heads({2: 1}, [3] * 4) == [3, 3, 1, 3]
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        parse_kv_heads("4:1", [3] * 4)
    with pytest.raises(ValueError, match="3 KV-head counts for a model with 4 layers"):
        parse_kv_heads([1, 1, 1], [3] * 4)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_kv_heads("x:1", [3] * 4)


@pytest.mark.parametrize("kv_heads", ["4", "1:4", "0:2,2:4"])
def test_duplicate_is_exact_on_tiny(kv_heads):
    source = tiny_source(kv_heads=1, heads=4)
    model, report = convert_model(source, kv_heads, "duplicate")
    torch.testing.assert_close(logits(model), logits(source), atol=1e-6, rtol=0)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, do_sample=False),
                       source.generate(IDS, max_new_tokens=8, do_sample=False))
    assert all(row.error == 0.0 for row in report.layers)
    # the caller's model is untouched and shares no storage with the converted one
    model.model.embed_tokens.weight.data.zero_()
    assert source.model.embed_tokens.weight.abs().sum() > 0


def measured_error(source, model, layer: int) -> float:
    """Relative K/V reconstruction error per query head, measured directly from the two models' projections."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"]

    handle = source.model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        source(CALIBRATION)
    handle.remove()
    hidden = captured["hidden"].reshape(-1, source.config.hidden_size)
    old, new = source.model.layers[layer].self_attn, model.model.layers[layer].self_attn
    head_dim = old.head_dim
    old_map = [h // (source.config.num_attention_heads // source.config.num_key_value_heads)
               for h in range(source.config.num_attention_heads)]
    errors = []
    for name in ("k_proj", "v_proj"):
        with torch.no_grad():
            a = getattr(old, name)(hidden).reshape(len(hidden), -1, head_dim)[:, old_map]
            b = getattr(new, name)(hidden).reshape(len(hidden), -1, head_dim)[:, new.kv_map]
        errors.append(float(((a - b) ** 2).sum() / (a**2).sum()))
    return sum(errors) / 2


def test_mean_and_similarity_errors_are_real_and_similarity_never_worse():
    source = tiny_source(kv_heads=6, heads=6, layers=2, seed=3)
    results = {}
    for method in ("mean", "similarity"):
        model, report = convert_model(source, "0:2,1:3", method, calibration_ids=CALIBRATION)
        results[method] = (model, report)
        for layer in (0, 1):
            row = report.layers[layer]
            assert row.error == pytest.approx(measured_error(source, model, layer), rel=1e-4)
            assert model.config.conversion["layer_errors"][layer] == pytest.approx(row.error)
        out = model.generate(IDS, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, IDS.shape[1] + 4)
    mean, similarity = results["mean"][1], results["similarity"][1]
    assert mean.layers[0].groups == contiguous_partition(6, 2) == [[0, 1, 2], [3, 4, 5]]
    for layer in (0, 1):
        assert similarity.layers[layer].error <= mean.layers[layer].error + 1e-9
        assert similarity.layers[layer].mean_error == pytest.approx(mean.layers[layer].error)
    assert any(s.error < m.error - 1e-6 for s, m in zip(similarity.layers, mean.layers))  # it does search


def test_uneven_merge_and_large_search_space():
    source = tiny_source(kv_heads=8, heads=8, layers=2, seed=5)
    # 8 -> 3: uneven groups; 8 -> 4 exhaustive (1701 groupings) in layer 1
    model, report = convert_model(source, "0:3,1:4", "similarity", calibration_ids=CALIBRATION)
    assert sorted(len(g) for g in report.layers[0].groups) != [3, 3, 3]
    assert report.layers[0].error <= report.layers[0].mean_error + 1e-9
    assert model.config.num_key_value_heads_per_layer == [3, 4]
    assert logits(model).shape == (1, IDS.shape[1], 128)


def test_local_search_path(monkeypatch):
    from selective_attention.gqa.conversion import grouping

    monkeypatch.setattr(grouping, "MAX_ENUMERATED_GROUPINGS", 0)
    source = tiny_source(kv_heads=8, heads=8, layers=1, seed=7)
    _, report = convert_model(source, "0:4", "similarity", calibration_ids=CALIBRATION)
    assert report.layers[0].error <= report.layers[0].mean_error + 1e-9


def test_bad_input(tmp_path):
    source = tiny_source(kv_heads=2, heads=4, layers=2)
    with pytest.raises(ValueError, match="cannot raise 2 KV heads to 3"):
        convert_model(source, "0:3", "duplicate")
    with pytest.raises(ValueError, match="5 KV heads is impossible with 4 query heads"):
        convert_model(source, "0:5", "duplicate")
    with pytest.raises(ValueError, match="duplicate can only raise"):
        convert_model(source, "0:1", "duplicate")
    with pytest.raises(ValueError, match="out of range"):
        convert_model(source, "2:4", "duplicate")
    with pytest.raises(ValueError, match="unknown method"):
        convert_model(source, "0:1", "rows")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    supported = "convert supports these model types: llama, mistral, qwen2, qwen3, selective_llama"
    with pytest.raises(ValueError, match=f"'gpt2' model; {supported}"):
        convert_model(gpt2, "0:1", "mean")
    gemma = AutoModelForCausalLM.from_config(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=2,
                                                              num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match=f"'gemma3_text' model; {supported}"):
        convert_model(gemma, "4", "duplicate")
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model"):
        convert_model(tmp_path / "gpt2", "0:1", "mean")
    with pytest.raises(FileNotFoundError):
        convert_model(tmp_path / "nowhere", "0:1", "mean")


def test_broken_checkpoints_are_refused(tmp_path):
    source = tiny_source(kv_heads=2, heads=4, layers=2)
    for name in ("missing", "mismatched"):
        source.save_pretrained(tmp_path / name)
    weights = tmp_path / "missing" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys.*k_proj"):
        convert_model(tmp_path / "missing", "4", "duplicate", out_dir=tmp_path / "out")
    config_path = tmp_path / "mismatched" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_key_value_heads"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mismatch|size"):
        convert_model(tmp_path / "mismatched", "4", "duplicate", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_output_and_overwrite(tmp_path, monkeypatch):
    source = tiny_source(kv_heads=2, heads=4, layers=2)
    out = tmp_path / "converted"
    model, _ = convert_model(source, "4", "duplicate", out_dir=out)
    assert (out / "model.safetensors").is_file() and (out / "conversion_report.json").is_file()
    with pytest.raises(ValueError, match="already exists"):
        convert_model(source, "4", "duplicate", out_dir=out)

    from selective_attention.gqa import modeling_selective_llama

    def broken_save(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(modeling_selective_llama.SelectiveLlamaPreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_model(source, "0:4", "duplicate", out_dir=out, overwrite=True)
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text())["num_key_value_heads_per_layer"] == [4, 4]  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no partial folder left behind
    convert_model(source, "0:4", "duplicate", out_dir=out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads_per_layer"] == [4, 2]


def test_convert_a_converted_checkpoint(tmp_path):
    source = tiny_source(kv_heads=2, heads=4, layers=2)
    convert_model(source, "0:4", "duplicate", out_dir=tmp_path / "a")
    model, report = convert_model(tmp_path / "a", "0:1,1:1", "mean", calibration_ids=CALIBRATION)
    assert [row.source_kv_heads for row in report.layers] == [4, 2]
    assert model.config.num_key_value_heads_per_layer == [1, 1]


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer, 64-token chat prompt, its logits, its 10-token greedy continuation), computed once."""
    from selective_attention.loading.loader import load_model

    model, tokenizer = load_model(None, dtype="float32")
    messages = [{"role": "user", "content": "Write two sentences about the history of Paris and its river."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :64]
    return model, tokenizer, ids, logits(model, ids), model.generate(ids, max_new_tokens=10, do_sample=False)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", ["9", "29:9"])
def test_duplicate_smollm2_is_exact(smollm2, kv_heads):
    source, tokenizer, ids, expected_logits, expected_tokens = smollm2
    model, report = convert_model(source, kv_heads, "duplicate", tokenizer=tokenizer)
    expected = [9] * 30 if kv_heads == "9" else [3] * 29 + [9]
    assert model.config.num_key_value_heads_per_layer == expected
    assert (logits(model, ids) - expected_logits).abs().max().item() <= 1e-4
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), expected_tokens)


@pytest.mark.slow
def test_mean_and_similarity_smollm2_cli_and_fresh_process(smollm2, tmp_path, capsys):
    source, tokenizer, ids, _, _ = smollm2
    mean_model, mean_report = convert_model(source, "29:1,0:2", "mean", tokenizer=tokenizer, calibration_tokens=256)
    assert "| 29 | 3 -> 1 | mean |" in mean_report.table()
    assert mean_model.generate(ids, max_new_tokens=6, do_sample=False).shape[1] > ids.shape[1]

    out = tmp_path / "similarity"
    assert main(["convert", "--kv-heads", "29:1,0:2", "--method", "similarity", "--out", str(out),
                 "--calibration-tokens", "256"]) == 0
    printed = capsys.readouterr().out
    assert "| 29 | 3 -> 1 | similarity |" in printed and "| 0 | 3 -> 2 | similarity |" in printed
    report = json.loads((out / "conversion_report.json").read_text())
    errors = {"mean": mean_report.errors, "similarity": [row["error"] for row in report["layers"]]}
    assert errors["mean"][29] == pytest.approx(errors["similarity"][29], rel=1e-4)  # 3 -> 1: one grouping exists
    assert all(s <= m + 1e-6 for s, m in zip(errors["similarity"], errors["mean"]))
    assert errors["mean"][29] > 0

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plugin installed: no flag
    assert model.config.num_key_value_heads_per_layer == [2] + [3] * 28 + [1]
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape[1] > ids.shape[1]
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    assert cache.layers[29].keys.shape[1] == 1 and cache.layers[0].keys.shape[1] == 2
    # convert -> save -> load in a fresh process without the plugin -> same logits
    torch.testing.assert_close(load_in_fresh_process(out, ids, tmp_path), logits(model, ids), atol=1e-5, rtol=1e-5)
