"""Attention maps recorded through `sa_record` equal softmax(QK^T) computed by hand."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from selective_attention import mask_heads
from selective_attention.attention.maps import attention_maps, record_attention
from selective_attention.plots import plot_average, plot_head_across_layers, plot_layer, plot_map_comparison

from .conftest import build_tiny, tiny_llama_config


def _by_hand(model, ids: torch.Tensor, layer: int, zero_query_heads=()) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal) from the layer's own projections and RoPE."""
    captured = {}
    attention = model.model.layers[layer].self_attn
    hook = attention.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=kwargs["hidden_states"]),
                                               with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    x = captured["x"]
    batch, length, _ = x.shape
    d = attention.head_dim
    q = attention.q_proj(x).view(batch, length, -1, d).transpose(1, 2)
    k = attention.k_proj(x).view(batch, length, -1, d).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, torch.arange(length)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for head in zero_query_heads:
        q[:, head] = 0
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_recorded_map_equals_hand_computation(base):
    model = build_tiny(tiny_llama_config(), attn_implementation=base)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with record_attention(model) as record, torch.no_grad():
        recorded_logits = model(input_ids=ids).logits
    assert model.config._attn_implementation == base
    assert torch.allclose(recorded_logits, plain, atol=1e-5)  # recording does not change the output
    for layer in (0, 1):
        assert torch.allclose(record[layer], _by_hand(model, ids, layer), atol=1e-5)


def test_map_reflects_uniform_head_mask():
    model = build_tiny(tiny_llama_config())
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with mask_heads(model, ["0-2"], mode="uniform"), record_attention(model, [0]) as record, torch.no_grad():
        model(input_ids=ids)
    assert torch.allclose(record[0], _by_hand(model, ids, 0, zero_query_heads=[2]), atol=1e-5)
    uniform = torch.tril(torch.ones(7, 7)) / torch.arange(1, 8)[:, None]
    assert torch.allclose(record[0][0, 2], uniform, atol=1e-6)


def test_bad_layer_is_named():
    model = build_tiny(tiny_llama_config())
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] out of range"):
        with record_attention(model, [5]):
            pass
    assert model.config._attn_implementation == "sdpa"


class _CharTokenizer:
    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([[3 + (ord(c) % 120) for c in text]])
        return type("Batch", (dict,), {"input_ids": ids, "to": lambda self, device: self})({"input_ids": ids})

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_plots_open_with_labelled_axes(tmp_path):
    model = build_tiny(tiny_llama_config())
    maps, tokens = attention_maps(model, _CharTokenizer(), "needle in hay")
    assert set(maps) == {0, 1} and maps[0].shape == (4, len(tokens), len(tokens))
    paths = [plot_layer(maps, tokens, 0, tmp_path / "layer0.png"),
             plot_head_across_layers(maps, tokens, 1, tmp_path / "head1.png"),
             plot_average(maps, tokens, tmp_path / "mean.png"),
             plot_map_comparison(maps, {k: v.flip(-1) for k, v in maps.items()}, tokens, 1, 0, tmp_path / "cmp.png")]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots()
    from selective_attention.plots.attention import _draw, _printable

    _draw(ax, maps[0][0], tokens, "t")
    assert ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [_printable(t) for t in tokens] and all(label.isprintable() for label in labels)
    assert "\\x04" in labels  # the random model's control-character token, escaped
    plt.close(figure)


@pytest.mark.slow
def test_cli_masks_the_embedded_models_top_heads_from_its_shipped_scores(embedded_model_dir, tmp_path):
    from safetensors.torch import load_file

    from selective_attention.cli import main

    out = tmp_path / "maps"
    assert main(["attention-map", "--layers", "0,18", "--head", "6", "--mask", "top:3", "--mask-mode", "uniform",
                 "--out", str(out)]) == 0
    for name in ("layer18.png", "after/layer18.png", "compare_layer18_head6.png", "tokens.json"):
        assert (out / name).is_file(), name
    maps = load_file(str(out / "maps.safetensors"))
    before, after = maps["before.layer18"], maps["after.layer18"]
    assert torch.allclose(before.sum(-1), torch.ones_like(before.sum(-1)), atol=1e-4)
    # 18-6 is the embedded model's top retrieval head: uniform masking flattens its rows; layer 0 lies before
    # every masked head (the shipped top-3 sit in layers 17-23) and does not change
    rows = torch.arange(before.shape[-1])
    assert torch.allclose(after[6, rows, 0], 1.0 / (rows + 1), atol=1e-5)
    assert (after[6] - before[6]).abs().max() > 0.1
    assert torch.equal(maps["after.layer0"], maps["before.layer0"])


@pytest.mark.slow
def test_cli_refuses_a_bad_mask_before_writing_anything(embedded_model_dir, tmp_path):
    from selective_attention.cli import main

    out = tmp_path / "maps"
    assert main(["attention-map", "--layers", "18", "--mask", "top:999", "--out", str(out)]) == 2
    assert main(["attention-map", "--layers", "30", "--out", str(out)]) == 2
    assert not out.exists()


def test_recording_keeps_the_tree_kernel_running():
    """Maps of a tree-kernel model come from its own (approximated) forward: recording must not swap in SDPA."""
    from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel

    model = build_tiny(tiny_llama_config())
    text = "a needle in a haystack is hard to find, harder still when the hay is long and the needle short " * 2
    dense, tokens = attention_maps(model, _CharTokenizer(), text)
    ids = _CharTokenizer()(text).input_ids
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits

    configure_tree_kernel(model, TreeKernelConfig(method="bound", fraction=1.0, leaf_block=4))
    full, _ = attention_maps(model, _CharTokenizer(), text)
    assert all(torch.allclose(full[layer], dense[layer], atol=1e-5) for layer in dense)

    configure_tree_kernel(model, TreeKernelConfig(method="bound", fraction=0.1, leaf_block=4, min_keys=4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with record_attention(model, [0, 1]) as record, torch.no_grad():
        recorded = model(input_ids=ids).logits
    assert torch.equal(recorded, expected)  # the tree kernel ran while recording
    assert (expected - dense_logits).abs().max() > 1e-4  # ... and it is not SDPA at this budget
    assert model.config._attn_implementation == "sa_tree_kernel"
    approximated, _ = attention_maps(model, _CharTokenizer(), text)
    assert torch.allclose(approximated[0], dense[0], atol=1e-5)  # layer 0 sees the same queries and keys
    # layer 1 sees the approximated layer 0's output (a random model attends almost uniformly: small but real)
    assert (approximated[1] - dense[1]).abs().max() > 1e-5
    assert len(record.layers) == 2


@pytest.mark.slow
def test_cli_tree_kernel_intervention(embedded_model_dir, tmp_path):
    from safetensors.torch import load_file

    from selective_attention.cli import main

    out = tmp_path / "maps"
    text = " ".join(["The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park."] * 4)
    assert main(["attention-map", "--layers", "0,29", "--text", text, "--tree-kernel", "bound", "--tree-fraction",
                 "0.1", "--out", str(out)]) == 0
    assert (out / "after" / "layer29.png").is_file() and (out / "compare_layer29_head0.png").is_file()
    maps = load_file(str(out / "maps.safetensors"))
    assert torch.allclose(maps["after.layer0"], maps["before.layer0"], atol=1e-5)
    assert (maps["after.layer29"] - maps["before.layer29"]).abs().max() > 1e-3
    assert main(["attention-map", "--tree-kernel", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
