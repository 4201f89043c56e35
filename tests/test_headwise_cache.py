"""Head-wise KV cache: exactness against transformers' DynamicCache and against attention computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, MistralConfig, Qwen2Config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from selective_attention import mask_heads
from selective_attention.cache import (
    HeadwiseLayer,
    HeadwisePolicy,
    cache_bytes,
    headwise_cache,
    kv_budget,
    prefill,
)
from selective_attention.modeling import cache_kwargs
from selective_attention.gqa import (
    headwise_attention_selective_llama as headwise_attention,
)

from .conftest import build_tiny, tiny_llama_config

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
FAMILIES = {
    "llama": lambda: tiny_llama_config(),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
}
MIXED = ((1, 0), (0, 1))  # layer 0: KV head 0 full, 1 streaming; layer 1 the other way round
GENERATE = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _ids(batch: int = 1, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache=None, steps: int = 6, **kwargs):
    extra = cache_kwargs(cache) if cache is not None else {}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, **extra, **GENERATE, **kwargs)


def _assert_same_generation(a, b, atol: float = 1e-5) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.allclose(x, y, atol=atol, rtol=0)


def test_registered_with_both_interfaces():
    assert "sa_headwise_sdpa" in AttentionInterface._global_mapping
    assert "sa_headwise_sdpa" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_full_equals_dynamic_cache(family):
    model = build_tiny(FAMILIES[family]())
    ids = _ids()
    dense = _generate(model, ids)
    with headwise_cache(model, full=1.0, sink=4, window=8) as cache:
        assert all(type(layer) is DynamicLayer for layer in cache.layers)
        _assert_same_generation(_generate(model, ids, cache), dense)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_window_covering_context_equals_dynamic_cache(family):
    model = build_tiny(FAMILIES[family]())
    ids = _ids()
    dense = _generate(model, ids, steps=8)
    for pattern, sink in ((MIXED, 2), (((0, 0), (0, 0)), 0)):
        with headwise_cache(model, policy=HeadwisePolicy(pattern, sink=sink, window=40)) as cache:
            result = _generate(model, ids, cache, steps=8)
            assert all(isinstance(layer, HeadwiseLayer) for layer in cache.layers)
        _assert_same_generation(result, dense)


def _hand_attention(q, k, v, allowed, scale):
    """Softmax attention of one query row over the allowed key positions, computed with plain tensor ops."""
    weights = torch.softmax((k[allowed] @ q) * scale, dim=0)
    return weights @ v[allowed]


@pytest.mark.parametrize("chunk, block", [(None, 512), (None, 4), (5, 512), (9, 2)])
def test_streaming_head_equals_attention_over_sink_and_window_by_hand(chunk, block, monkeypatch):
    monkeypatch.setattr(headwise_attention, "BLOCK_ROWS", block)  # query rows per streaming-attention block
    sink, window, length, steps = 3, 5, 20, 4
    model = build_tiny(tiny_llama_config())
    attention = model.model.layers[0].self_attn
    inputs, outputs = [], []
    pre = attention.register_forward_pre_hook(lambda m, a, kw: inputs.append((kw["hidden_states"],
                                                                             kw["position_embeddings"])),
                                              with_kwargs=True)
    post = attention.o_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0]))
    cache = headwise_cache(model, policy=HeadwisePolicy(MIXED, sink=sink, window=window))
    with cache:
        out = prefill(model, cache, _ids(length=length), chunk=chunk)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            with torch.no_grad():
                out = model(input_ids=token, **cache_kwargs(cache), use_cache=True)
    pre.remove()
    post.remove()
    hidden = torch.cat([h for h, _ in inputs], dim=1)
    cos, sin = (torch.cat([pe[i] for _, pe in inputs], dim=1) for i in range(2))
    shape = (1, hidden.shape[1], -1, attention.head_dim)
    with torch.no_grad():
        q, k = apply_rotary_pos_emb(attention.q_proj(hidden).view(shape).transpose(1, 2),
                                    attention.k_proj(hidden).view(shape).transpose(1, 2), cos, sin)
        v = attention.v_proj(hidden).view(shape).transpose(1, 2)
    produced = torch.cat(outputs, dim=1).view(1, hidden.shape[1], 4, attention.head_dim)
    positions = torch.arange(hidden.shape[1])
    for p in range(hidden.shape[1]):
        for head in range(4):
            kv = head // 2  # layer 0 of MIXED: KV head 0 full, KV head 1 streaming
            allowed = positions <= p
            if kv == 1:
                allowed &= (positions < sink) | (p - positions <= window)
            expected = _hand_attention(q[0, head, p], k[0, kv], v[0, kv], allowed, attention.scaling)
            assert torch.allclose(produced[0, p, head], expected, atol=1e-5), (p, head)
    streaming = cache.layers[0]
    assert streaming.stream_keys.shape[-2] == sink + window
    assert torch.allclose(streaming.stream_keys[0, 0, :sink], k[0, 1, :sink], atol=1e-6)  # stored after RoPE
    assert torch.allclose(streaming.stream_keys[0, 0, sink:], k[0, 1, -window:], atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 4])
def test_cached_decode_equals_recomputation_under_the_policy(chunk):
    model = build_tiny(Qwen2Config(**TINY))
    policy = HeadwisePolicy(MIXED, sink=2, window=6)
    ids = _ids(length=30)
    with headwise_cache(model, policy=policy) as cache:
        logits = [prefill(model, cache, ids, chunk=chunk).logits[:, -1]]
        tokens = ids
        for _ in range(5):
            token = logits[-1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            with torch.no_grad():
                logits.append(model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits[:, -1])
        assert cache.get_seq_length() == tokens.shape[1]
        assert cache.layers[0].stream_keys.shape[-2] == 2 + 6
        with torch.no_grad():  # no cache: the policy applies over all positions
            recomputed = model(input_ids=tokens).logits[0, ids.shape[1] - 1:]
    assert torch.allclose(torch.cat(logits), recomputed, atol=1e-4, rtol=0)
    with torch.no_grad():
        dense = model(input_ids=tokens).logits[0, ids.shape[1] - 1:]
    assert not torch.allclose(dense, recomputed, atol=1e-3)  # the policy does change the model


@pytest.mark.parametrize("block", [512, 3])
def test_left_padded_batch_equals_runs_alone(block, monkeypatch):
    monkeypatch.setattr(headwise_attention, "BLOCK_ROWS", block)
    model = build_tiny(tiny_llama_config())
    model.generation_config.eos_token_id = None  # compare all ten steps
    policy = HeadwisePolicy(MIXED, sink=3, window=6)
    long, short = _ids(length=26, seed=2)[0], _ids(length=15, seed=3)[0]
    padded = torch.stack([long, torch.cat([torch.zeros(11, dtype=torch.long), short])])
    mask = (torch.arange(26)[None] >= torch.tensor([[0], [11]])).long()
    alone = []
    for row in (long, short):
        with headwise_cache(model, policy=policy) as cache:
            alone.append(_generate(model, row[None], cache, steps=10))
    with headwise_cache(model, policy=policy) as cache:
        batch = _generate(model, padded, cache, steps=10, attention_mask=mask)
        assert cache.layers[0].recent_start is not None  # both rows' streaming heads were trimmed
    for row, single in enumerate(alone):
        assert torch.equal(batch.sequences[row, -10:], single.sequences[0, -10:])
        for x, y in zip(batch.logits, single.logits):
            assert torch.allclose(x[row], y[0], atol=1e-4, rtol=0)


def test_beam_search_reorders_streaming_heads():
    model = build_tiny(tiny_llama_config())
    ids = _ids(length=12)
    dense = _generate(model, ids, num_beams=3, steps=6)
    with headwise_cache(model, policy=HeadwisePolicy(MIXED, sink=1, window=30)) as cache:
        _assert_same_generation(_generate(model, ids, cache, num_beams=3, steps=6), dense)


def test_mask_heads_applies_on_top():
    model = build_tiny(tiny_llama_config())
    ids = _ids()
    with mask_heads(model, ["1-2", "0-0"], mode="zero"):
        expected = _generate(model, ids)
    with headwise_cache(model, policy=HeadwisePolicy(MIXED, sink=2, window=40)) as cache:
        with mask_heads(model, ["1-2", "0-0"], mode="zero"):
            assert model.config._attn_implementation == "sa_headwise_sdpa"
            _assert_same_generation(_generate(model, ids, cache), expected)


def test_sliding_window_layers_keep_their_own_cache():
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = build_tiny(config)
    ids = _ids(length=20)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=6, **cache_kwargs(DynamicCache(config=model.config)), **GENERATE)
    with headwise_cache(model, full=0, sink=2, window=40) as cache:
        assert cache.policy.pattern == ((0, 0), (1, 1))
        assert isinstance(cache.layers[0], HeadwiseLayer) and type(cache.layers[1]) is DynamicSlidingWindowLayer
        _assert_same_generation(_generate(model, ids, cache), dense)
    with pytest.raises(ValueError, match="layer 1 is a sliding_attention layer"):
        headwise_cache(model, policy=HeadwisePolicy(((0, 0), (0, 1)), sink=2, window=4))


def test_budget_matches_measured_bytes_and_crop_rules():
    model = build_tiny(tiny_llama_config())
    policy = HeadwisePolicy(MIXED, sink=2, window=5)
    with headwise_cache(model, policy=policy) as cache:
        prefill(model, cache, _ids(length=6))
        cache.crop(-2)  # nothing dropped yet: exact rollback
        assert cache.get_seq_length() == 4 and cache.layers[0].stream_keys.shape[-2] == 4
        prefill(model, cache, _ids(length=36))
        budget = kv_budget(model, policy, 40)
        assert cache_bytes(cache) == budget.kept_bytes
        dense = DynamicCache(config=model.config)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            model(input_ids=_ids(length=40), **cache_kwargs(dense), use_cache=True)
        assert cache_bytes(dense) == budget.dense_bytes
        assert budget.fraction == pytest.approx((2 * 40 + 2 * 7) / (4 * 40))
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(full=0.0), r"fraction of full KV heads must lie in \(0, 1\]"),
    (dict(full=1.5), r"fraction of full KV heads must lie in \(0, 1\]"),
    (dict(full=5), "asked for 5 full KV heads"),
    (dict(full=1.0, sink=64, window=200), "exceeds the model's context of 256"),
    (dict(full=0.5, method="best"), "unknown selection method"),
    (dict(full=0.5, threshold=0.2), "exactly one of"),
    (dict(full=2), "needs head scores"),
])
def test_bad_input_is_named(kwargs, message):
    model = build_tiny(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        headwise_cache(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"  # refused before touching the model


def test_score_file_from_another_model_is_refused(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"0-1": [0.5]}))
    (tmp_path / "scores.meta.json").write_text(json.dumps({"model": "other", "num_layers": 32, "num_heads": 32}))
    with pytest.raises(ValueError, match="made for other with 32 layers x 32 heads"):
        headwise_cache(build_tiny(tiny_llama_config()), path, full=1)
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text("1\t0\t0\n0\t1\t0\n")
    with pytest.raises(ValueError, match="this model has 2 layers x 2 KV heads"):
        headwise_cache(build_tiny(tiny_llama_config()), tsv, full=1)


def test_model_without_attention_interface_is_refused():
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        headwise_cache(nn.Linear(2, 2), full=1.0)


def test_cache_needs_the_headwise_attention():
    model = build_tiny(tiny_llama_config())
    cache = headwise_cache(model, policy=HeadwisePolicy(MIXED, sink=2, window=4))
    cache.handle.remove()
    with pytest.raises(RuntimeError, match="needs the attention implementation 'sa_headwise_sdpa'"), torch.no_grad():
        model(input_ids=_ids(), **cache_kwargs(cache), use_cache=True)


def test_score_keys_pick_the_kv_head_that_serves_the_query_head():
    """From a score file's "layer-query_head" key to the heads that attend fully, checked against transformers'
    own KV expansion (`repeat_kv`: query head h reads KV head h // groups), layer by layer."""
    from transformers.models.llama.modeling_llama import repeat_kv

    sink, window, length = 2, 4, 20
    model = build_tiny(tiny_llama_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=48))
    scores = {"0-4": [0.9], "1-1": [0.8], "1-3": [0.1], "0-0": [0.0]}  # query heads 4 (layer 0) and 1 (layer 1)
    inputs, outputs = {}, {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        hooks.append(attention.register_forward_pre_hook(
            lambda m, a, kw, i=index: inputs.__setitem__(i, (kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True))
        hooks.append(attention.o_proj.register_forward_pre_hook(lambda m, a, i=index: outputs.__setitem__(i, a[0])))
    with headwise_cache(model, scores, full=2, sink=sink, window=window) as cache:
        assert cache.policy.pattern == ((0, 0, 1), (1, 0, 0))  # 4 // 2 = KV head 2; 1 // 2 = KV head 0
        prefill(model, cache, _ids(length=length))
    for hook in hooks:
        hook.remove()
    positions = torch.arange(length)
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        hidden, (cos, sin) = inputs[index]
        shape = (1, length, -1, attention.head_dim)
        with torch.no_grad():
            q, k = apply_rotary_pos_emb(attention.q_proj(hidden).view(shape).transpose(1, 2),
                                        attention.k_proj(hidden).view(shape).transpose(1, 2), cos, sin)
            v = attention.v_proj(hidden).view(shape).transpose(1, 2)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)  # (1, 6 query heads, length, head_dim), transformers' order
        produced = outputs[index].view(1, length, 6, attention.head_dim)
        full_query_heads = {0: {4, 5}, 1: {0, 1}}[index]
        for head in range(6):
            for p in (length - 1, length - 5):
                allowed = positions <= p
                if head not in full_query_heads:
                    allowed &= (positions < sink) | (p - positions <= window)
                expected = _hand_attention(q[0, head, p], k[0, head], v[0, head], allowed, attention.scaling)
                assert torch.allclose(produced[0, p, head], expected, atol=1e-5), (index, head, p)


def test_dense_prefill_then_trim():
    """`trial_cache(dense_prefill=True)`: the prompt but its last token runs through the dense model and the cache is
    trimmed after it, so every kept key and value (in a deeper layer too, whose input depends on the layers below
    attending densely) is the dense model's; a streaming prefill keeps other values."""
    from selective_attention.cache import dense_attention
    from selective_attention.cache.headwise import trial_cache

    model = build_tiny(Qwen2Config(**TINY))
    policy = HeadwisePolicy(MIXED, sink=2, window=6)
    ids = _ids(length=30)[0].tolist()
    with torch.no_grad():
        dense = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).past_key_values
    with headwise_cache(model, policy=policy) as handle_cache:
        plans = [layer.self_attn.sa_headwise_plan for layer in model.model.layers]
        with dense_attention(model):
            assert all(layer.self_attn.sa_headwise_plan is None for layer in model.model.layers)
        assert [layer.self_attn.sa_headwise_plan for layer in model.model.layers] == plans
        cache, cached = trial_cache(model, policy, None, 0, ids, dense_prefill=True)
        assert cached == len(ids) - 1 and handle_cache.get_seq_length() == 0
        streamed, _ = trial_cache(model, policy, None, 0, ids)
        prefill(model, streamed, torch.tensor([ids[:-1]]))
    for index in range(2):  # MIXED: layer 0 streams KV head 1, layer 1 KV head 0
        stream_head, full_head = (1, 0) if index == 0 else (0, 1)
        layer, keys, values = cache.layers[index], dense.layers[index].keys, dense.layers[index].values
        assert layer.stream_keys.shape[-2] == 2 + 6 and layer.keys.shape[-2] == len(ids) - 1
        kept = torch.cat([torch.arange(2), torch.arange(len(ids) - 7, len(ids) - 1)])
        for ours, theirs in ((layer.stream_keys, keys), (layer.stream_values, values)):
            assert torch.allclose(ours[:, 0], theirs[:, stream_head, kept], atol=1e-5)
        assert torch.allclose(layer.keys[:, 0], keys[:, full_head], atol=1e-5)
        assert torch.allclose(layer.values[:, 0], values[:, full_head], atol=1e-5)
    assert not torch.allclose(streamed.layers[1].stream_values, cache.layers[1].stream_values, atol=1e-4)
