"""selective_llama on tiny random models: per-layer KV heads, uneven maps, cache sizes, masks, checkpoints, PEFT."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from .conftest import build_tiny, tiny_llama_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

import selective_attention
from selective_attention import mask_heads, masked_heads, unmask_heads
from selective_attention.modeling import output_cache
from selective_attention.gqa import SelectiveLlamaConfig, SelectiveLlamaForCausalLM

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 23, 64, 7, 11, 2, 90]])
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


def selective_tiny(counts, maps=None, attn="sdpa", seed=0, **overrides) -> SelectiveLlamaForCausalLM:
    config = SelectiveLlamaConfig(**{**TINY, **overrides}, num_key_value_heads_per_layer=counts, kv_head_map=maps)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def expanded_reference(model: SelectiveLlamaForCausalLM, attn: str) -> LlamaForCausalLM:
    """A plain multi-head Llama whose K/V heads are the selective model's, gathered per query head."""
    config = tiny_llama_config(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"]})
    reference = build_tiny(config, attn)
    state = model.state_dict()
    head_dim = model.config.head_dim
    for layer, kv_map in enumerate(model.config.kv_head_map):
        for name in ("k_proj", "v_proj"):
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            state[key] = state[key].reshape(-1, head_dim, TINY["hidden_size"])[torch.tensor(kv_map)].reshape(-1, TINY["hidden_size"])
    reference.load_state_dict(state)
    return reference


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_uneven_noncontiguous_map_equals_expanded_mha(attn):
    maps = [[0, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 2]]  # 1 head; even but interleaved; uneven 2+1+1
    model = selective_tiny([1, 2, 3], maps, attn=attn)
    assert [m.self_attn.contiguous for m in model.model.layers] == [True, False, False]
    reference = expanded_reference(model, attn)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    # incremental decoding with the cache agrees with the full forward
    generated = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference.generate(IDS, max_new_tokens=6, do_sample=False))


def test_cache_holds_each_layers_own_kv_heads():
    model = selective_tiny([1, 2, 4])
    with torch.no_grad():
        cache = output_cache(model(IDS, use_cache=True))
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, 2, 4]
    assert [layer.values.shape[1] for layer in cache.layers] == [1, 2, 4]


def test_config_validation():
    with pytest.raises(ValueError, match="cannot form equal groups"):
        SelectiveLlamaConfig(**TINY, num_key_value_heads_per_layer=[3, 2, 2])
    with pytest.raises(ValueError, match="must use every KV head"):
        SelectiveLlamaConfig(**TINY, num_key_value_heads_per_layer=[2, 2, 2], kv_head_map=[[0, 0, 0, 0]] * 3)
    with pytest.raises(ValueError, match="entries for 3 layers"):
        SelectiveLlamaConfig(**TINY, num_key_value_heads_per_layer=[2, 2])
    config = SelectiveLlamaConfig(**TINY, num_key_value_heads_per_layer=[1, 4, 2])
    assert config.kv_head_map[0] == [0, 0, 0, 0] and config.kv_head_map[2] == [0, 0, 1, 1]
    assert config.num_key_value_heads == 4


def test_registered_with_auto_classes_and_attention_interface():
    model = selective_tiny([1, 2, 2])
    assert type(model)._can_set_attn_implementation()
    selective_attention.modeling.check_attention_interface(model)
    model.set_attn_implementation("sa_masked_eager")
    assert model.config._attn_implementation == "sa_masked_eager"


@pytest.mark.parametrize("mode", ["zero", "uniform", "mean"])
def test_mask_heads_on_selective_model_matches_expanded_reference(mode):
    maps = [[0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]]
    model = selective_tiny([2, 2, 1], maps)
    reference = expanded_reference(model, "sdpa")
    heads = ["1-1", "1-2", "2-3"]
    with mask_heads(model, heads, mode), mask_heads(reference, heads, mode):
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
        assert sorted((layer, head) for layer, head, _ in masked_heads(model)) == [(1, 1), (1, 2), (2, 3)]
    assert not torch.allclose(logits(model), logits(reference).roll(1, -1))  # sanity: distinct outputs exist


def test_persisted_mask_is_applied_on_load(tmp_path):
    model = selective_tiny([2, 1, 2], [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    plain = logits(model)
    handle = mask_heads(model, ["0-1", "2-0"], "mean")
    masked = logits(model)
    assert not torch.allclose(plain, masked)
    model.save_pretrained(tmp_path)
    handle.remove()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sa_masked_heads"] == ["0-1", "2-0"] and saved["sa_mask_mode"] == "mean"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config._attn_implementation == "sdpa"  # the model's own code applies the persisted mask
    torch.testing.assert_close(logits(loaded), masked, atol=1e-5, rtol=1e-5)
    assert sorted((layer, head, mode) for layer, head, mode in masked_heads(loaded)) == [(0, 1, "mean"), (2, 0, "mean")]
    unmask_heads(loaded)
    torch.testing.assert_close(logits(loaded), plain, atol=1e-5, rtol=1e-5)


def import_roots(source: str) -> set[str]:
    names = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    return {"." if name.startswith(".") else name.split(".")[0] for name in names}


def test_save_writes_auto_map_and_code(tmp_path):
    model = selective_tiny([1, 2, 4])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "selective_llama"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM",
                                       "AutoModelForSequenceClassification"}
    for name in ("modeling_selective_llama.py", "configuration_selective_llama.py", "head_mask_selective_llama.py",
                 "model.safetensors"):
        assert (tmp_path / name).is_file()
    source = (tmp_path / "modeling_selective_llama.py").read_text()
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source
    assert import_roots(source) == {"__future__", "collections", "torch", "transformers", "."}
    assert import_roots((tmp_path / "head_mask_selective_llama.py").read_text()) == {"__future__", "torch"}
    assert import_roots((tmp_path / "configuration_selective_llama.py").read_text()) <= {
        "__future__", "huggingface_hub", "transformers"}  # huggingface_hub: a dependency of transformers
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # no trust_remote_code
    assert isinstance(reloaded, SelectiveLlamaForCausalLM)
    torch.testing.assert_close(logits(reloaded), logits(model))


LOAD_WITHOUT_PLUGIN = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "selective_attention":
                raise ModuleNotFoundError(f"blocked {name}")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[2]))
    results = []
    for checkpoint in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            results.append(model(ids).logits)
        print(type(model).__module__, type(model).__name__)
    torch.save(results, sys.argv[3])
    assert not any(name.startswith("selective_attention") for name in sys.modules)
""")


def load_many_in_fresh_process(checkpoints, ids, tmp_path) -> list[torch.Tensor]:
    """Logits of each checkpoint, loaded in one subprocess where selective_attention cannot be imported."""
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_PLUGIN)
    out = tmp_path / "logits.pt"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    paths = json.dumps([str(checkpoint) for checkpoint in checkpoints])
    result = subprocess.run([sys.executable, "-I", str(script), paths, json.dumps(ids.tolist()), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(checkpoints)
    assert all("SelectiveLlamaForCausalLM" in line and "transformers_modules" in line for line in lines)
    return torch.load(out)


def load_in_fresh_process(checkpoint, ids, tmp_path) -> torch.Tensor:
    """Logits from `checkpoint` loaded in a subprocess where selective_attention cannot be imported."""
    return load_many_in_fresh_process([checkpoint], ids, tmp_path)[0]


def test_round_trip_without_plugin(tmp_path):
    model = selective_tiny([1, 2, 3], [[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 2]])
    model.save_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(load_in_fresh_process(tmp_path / "ckpt", IDS, tmp_path), logits(model))


def test_sequence_classification_from_causal_checkpoint(tmp_path):
    model = selective_tiny([1, 2, 2])
    model.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, dtype=torch.float32)
    assert type(classifier).__name__ == "SelectiveLlamaForSequenceClassification"
    torch.testing.assert_close(classifier.model.layers[0].self_attn.k_proj.weight,
                               model.model.layers[0].self_attn.k_proj.weight)
    batch = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    output = classifier(batch, attention_mask=(batch != 0).long(), labels=torch.tensor([0, 2]))
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)
    output.loss.backward()
    assert classifier.score.weight.grad is not None


def test_sequence_classification_loads_without_plugin(tmp_path):
    """The classification head builds its body through AutoModel: that must resolve under remote code too."""
    config = SelectiveLlamaConfig(**TINY, num_key_value_heads_per_layer=[1, 2, 2], num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    assert type(model.model).__name__ == "SelectiveLlamaModel"
    model.save_pretrained(tmp_path / "ckpt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_PLUGIN.replace("AutoModelForCausalLM", "AutoModelForSequenceClassification"))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-I", str(script), json.dumps([str(tmp_path / "ckpt")]),
                             json.dumps(IDS.tolist()), str(tmp_path / "logits.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "SelectiveLlamaForSequenceClassification" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt")[0], logits(model))


def test_peft_lora_trains_one_step():
    peft = pytest.importorskip("peft")
    model = selective_tiny([1, 2, 4], [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 3]]).train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in lora.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = lora(IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and any("k_proj" in n for n in changed)
    assert torch.isfinite(lora(IDS, labels=IDS).loss)
