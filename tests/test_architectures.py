"""The architecture matrix: every supported family, as a tiny random model, against transformers' own code.

For each family (2 layers, hidden 64, GQA where the family has it; sliding windows of 8 under 24-token prompts):
1. masked attention with an empty mask equals the base implementation (sdpa and eager);
2. zero ablation of heads equals zeroing the matching input columns of the output projection, on a copy of the
   model that never runs the plugin;
3. the probe's per-head argmax during cached greedy decoding equals a brute-force reference: the whole sequence
   run once with eager attention, `output_attentions=True` and no cache, read at absolute positions;
4. the tree kernel (`dense`, `topk`, `bound`) at full budget equals the plain model, at prefill and at cached
   decode steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from selective_attention import mask_heads
from selective_attention.attention.probe import probing
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel
from selective_attention.modeling import attention_modules, cache_kwargs
from selective_attention.retrieval.generate import greedy_decode

VOCAB = 128
PROMPT = 24
WINDOW = 8  # smaller than the prompt: sliding layers really drop keys at prefill and decode
NEW_TOKENS = 6
DECODE_STEPS = 4
ATOL = 1e-5
TREE_ATOL = 1e-4
INIT = 0.2  # peaked attention: argmaxes are clear, checks are sharp
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    """A transformers model family, a tiny config of it, and the features that config must exercise."""

    config: Callable[[], transformers.PretrainedConfig]
    base: tuple[str, ...] = ("sdpa", "eager")  # attention implementations the family itself supports
    #: feature -> config change that removes it; the tiny model must compute something else without it
    features: dict[str, Callable[[transformers.PretrainedConfig], None]] = field(default_factory=dict)


def _no_window(config) -> None:
    config.sliding_window = 4 * PROMPT


def _no_softcap(config) -> None:
    config.attn_logit_softcapping = None


def _no_nope(config) -> None:
    config.no_rope_layers = [1] * config.num_hidden_layers


FAMILIES: dict[str, Family] = {
    "llama": Family(lambda: transformers.LlamaConfig(**COMMON)),
    "mistral": Family(lambda: transformers.MistralConfig(**COMMON, sliding_window=WINDOW),
                      features={"sliding window": _no_window}),
    "qwen2": Family(lambda: transformers.Qwen2Config(**COMMON)),  # q/k/v bias
    "qwen3": Family(lambda: transformers.Qwen3Config(**COMMON, head_dim=16)),  # q/k RMSNorm per head
    "gemma2": Family(lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW,
                                                       attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
                     base=("eager",),  # transformers refuses sdpa with softcapping
                     features={"sliding window": _no_window, "softcapping": _no_softcap}),
    "gemma3": Family(lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW,
                                                           layer_types=["sliding_attention", "full_attention"],
                                                           query_pre_attn_scalar=16),
                     features={"sliding window": _no_window}),
    "phi3": Family(lambda: transformers.Phi3Config(**COMMON)),  # fused qkv_proj
    "gpt2": Family(lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                   bos_token_id=1, eos_token_id=2)),  # Conv1D, no RoPE, MHA
    "olmo2": Family(lambda: transformers.Olmo2Config(**COMMON)),  # q/k RMSNorm over all heads
    "granite": Family(lambda: transformers.GraniteConfig(**COMMON, attention_multiplier=0.3)),
    "cohere": Family(lambda: transformers.CohereConfig(**COMMON, use_qk_norm=True)),
    "stablelm": Family(lambda: transformers.StableLmConfig(**COMMON, partial_rotary_factor=0.5)),
    "starcoder2": Family(lambda: transformers.Starcoder2Config(**COMMON, sliding_window=WINDOW),
                         features={"sliding window": _no_window}),
    "smollm3": Family(lambda: transformers.SmolLM3Config(**COMMON, no_rope_layers=[1, 0]),
                      features={"layers without RoPE": _no_nope}),
    "phi": Family(lambda: transformers.PhiConfig(**{**COMMON, "num_key_value_heads": 4})),  # dense, partial RoPE
    "gpt_neox": Family(lambda: transformers.GPTNeoXConfig(**{k: v for k, v in COMMON.items()
                                                              if k != "num_key_value_heads"})),
}


# ------------------------------------------------------------------------------------------------- helpers


def build(name: str, attn: str = "sdpa", seed: int = 0, change: Callable | None = None):
    """A tiny random model whose attention is peaked (no near ties) and whose biases and norms are not trivial."""
    config = FAMILIES[name].config()
    config.initializer_range = INIT
    if change is not None:
        change(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    with torch.no_grad():  # biases start at zero and norm weights at one: make them count
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def plain(name: str) -> str:
    """The implementation the family runs by default in these tests (sdpa where the family allows it)."""
    return FAMILIES[name].base[0]


def prompt(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def output_projection(attention: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """(the module that maps concatenated head outputs to the residual stream, True if its weight is (in, out))."""
    for name in ("o_proj", "c_proj", "dense", "out_proj"):
        module = getattr(attention, name, None)
        if module is not None:
            return module, type(module).__name__ == "Conv1D"
    raise AssertionError(f"no output projection on {type(attention).__name__}")


def head_dim_of(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def greedy_reference(model, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill's last row and of `steps` cached decode steps, with the tokens fed (greedy)."""
    cache = DynamicCache(config=model.config)
    rows, tokens = [], []
    feed = ids
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=feed, **cache_kwargs(cache), use_cache=True)
            rows.append(out.logits[:, -1])
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            feed = torch.tensor([[token]])
    return rows, tokens


def forced_decode(model, ids: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(prefill logits, last-row logits of each cached step feeding `tokens`)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(input_ids=ids, **cache_kwargs(cache), use_cache=True).logits
        rows = [prefill[:, -1]]
        for token in tokens:
            rows.append(model(input_ids=torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True).logits[:, -1])
    return prefill, rows


# --------------------------------------------------------------------------------------------------- checks


def test_every_family_routes_attention_through_the_interface():
    for name in FAMILIES:
        model = build(name, plain(name))
        assert len(attention_modules(model)) == 2, name
        assert type(model)._can_set_attn_implementation(), name
        assert not any(p.dim() == 1 and bool((p == 0).all()) for p in model.parameters()), name


@pytest.mark.parametrize("name", sorted(name for name in FAMILIES if FAMILIES[name].features))
def test_tiny_configs_exercise_their_features(name):
    """Each special feature changes the tiny model's output: the checks below really run through it."""
    model = build(name, plain(name))
    ids = prompt()
    for feature, remove in FAMILIES[name].features.items():
        without = build(name, plain(name), change=remove)
        assert max_diff(logits(model, ids), logits(without, ids)) > 1e-2, feature


@pytest.mark.parametrize(("name", "base"), [(name, base) for name in sorted(FAMILIES) for base in FAMILIES[name].base])
def test_empty_mask_equals_base_implementation(name, base):
    model = build(name, base)
    ids = prompt(batch=2)
    expected = logits(model, ids)
    with mask_heads(model, [], mode="zero"):
        assert model.config._attn_implementation == f"sa_masked_{base}"
        got = logits(model, ids)
    assert max_diff(got, expected) <= ATOL


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zero_ablation_equals_zeroed_output_projection(name):
    model = build(name, plain(name))
    reference = copy.deepcopy(model)  # never sees the plugin
    heads = [(0, 0), (1, 2), (1, 3)]
    dim = head_dim_of(model)
    modules = attention_modules(reference)
    with torch.no_grad():
        for layer, head in heads:
            projection, transposed = output_projection(modules[layer][0])
            columns = slice(head * dim, (head + 1) * dim)
            if transposed:  # Conv1D: weight is (in, out), the heads are its rows
                projection.weight[columns] = 0
            else:
                projection.weight[:, columns] = 0
    ids = prompt(batch=2)
    with mask_heads(model, heads, mode="zero"):
        masked = logits(model, ids)
    assert max_diff(masked, logits(reference, ids)) <= ATOL
    assert max_diff(masked, logits(model, ids)) > 1e-3  # the heads mattered


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_probe_equals_absolute_position_reference(name):
    model = build(name, plain(name))
    ids = prompt()[0].tolist()
    with probing(model) as recorder:
        decoded = greedy_decode(model, ids, stop_ids=set(), max_new_tokens=NEW_TOKENS, recorder=recorder)
    probe = decoded.argmax  # (steps, layers, heads)
    assert probe.shape == (NEW_TOKENS, 2, 4)

    # Brute force: the whole sequence once, eager, no cache; row prompt_len - 1 + step produced token `step`.
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    sequence = torch.tensor([ids + decoded.tokens[:-1]])
    with torch.no_grad():
        attentions = eager(input_ids=sequence, use_cache=False, output_attentions=True).attentions
    weights = torch.stack([layer[0] for layer in attentions])  # (layers, heads, L, L)
    rows = weights[:, :, PROMPT - 1:PROMPT - 1 + NEW_TOKENS].permute(2, 0, 1, 3)  # (steps, layers, heads, L)
    expected = rows.argmax(-1)
    picked = rows.gather(-1, probe[..., None].clamp(max=rows.shape[-1] - 1))[..., 0]
    best = rows.amax(-1)
    differ = probe != expected
    assert (probe < sequence.shape[1]).all()
    assert ((best - picked)[differ] <= ATOL).all(), (
        f"{int(differ.sum())} of {differ.numel()} argmaxes differ from the absolute-position reference; "
        f"first at (step, layer, head) {differ.nonzero()[0].tolist()}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["dense", "topk", "bound"])
def test_tree_kernel_at_full_budget_equals_model(name, method):
    reference = build(name, plain(name))
    model = copy.deepcopy(reference)
    configure_tree_kernel(model, TreeKernelConfig(method=method, fraction=1.0, leaf_block=4))
    ids = prompt()
    expected_rows, tokens = greedy_reference(reference, ids, DECODE_STEPS)
    prefill, rows = forced_decode(model, ids, tokens[:DECODE_STEPS])
    diff = max_diff(prefill, logits(reference, ids))
    assert diff <= TREE_ATOL, f"prefill differs by {diff:.3g}"
    for step, (got, expected) in enumerate(zip(rows, expected_rows)):
        diff = max_diff(got, expected)
        assert diff <= TREE_ATOL, f"decode step {step} differs by {diff:.3g}"
