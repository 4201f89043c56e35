"""Section 3: retrieval-head detection, the probe (`probing` + `greedy_decode`) against the reference loop
(`reference_decode`: eager attention with `output_attentions=True`), on one trial each at 8K and 32K tokens.

- Exactness check (float64, the small random model, 8K): same generated tokens and identical per-step,
  per-layer, per-head argmax keys. float64 because in half precision the reference's argmax is taken over
  rounded attention weights, where near-equal keys tie and the first one wins: a disagreement there says nothing.
- Cost (bf16, the Llama-3.1-8B-shaped model, 8K and 32K): wall time and peak CUDA memory of each method on the
  same prompt; the reference materialises every layer's (heads x L x L) weights at prefill and is expected to run
  out of memory at 32K, which is reported, not raised. The fraction of argmax records that agree is reported
  over the steps both methods ran on the same tokens (up to and including the first step whose tokens differ).
"""

from __future__ import annotations

import time

import torch

from selective_attention.attention.probe import probing
from selective_attention.retrieval.generate import Decoded, greedy_decode, reference_decode

from .common import Suite, check, is_oom, peak_memory, random_ids, random_model, synchronize


def _probe(model, prompt: list[int], new_tokens: int) -> Decoded:
    with probing(model) as recorder:
        return greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=new_tokens, recorder=recorder)


def _reference(model, prompt: list[int], new_tokens: int) -> Decoded:
    return reference_decode(model, prompt, stop_ids=set(), max_new_tokens=new_tokens)


def _timed(suite: Suite, fn, *args) -> tuple[Decoded | None, dict]:
    """(result or None on out-of-memory, {seconds, peak_mib, extra_mib, error})."""
    result, info = None, {}
    with peak_memory(suite.device) as memory:
        start = time.perf_counter()
        try:
            result = fn(*args)
            synchronize(suite.device)
            info["seconds"] = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001  out of memory is a result here; anything else is re-raised
            if not is_oom(error):
                raise
            info["seconds"] = None
            info["error"] = f"out of memory: {str(error).splitlines()[0][:160]}"
    info.update(memory)
    if "error" in info:
        suite.empty_cache()
    return result, info


def _agreement(fast: Decoded, slow: Decoded) -> dict:
    """Argmax agreement over the steps that saw the same tokens (the first differing token's step included)."""
    steps = min(len(fast.tokens), len(slow.tokens))
    for index in range(steps):
        if fast.tokens[index] != slow.tokens[index]:
            steps = index + 1
            break
    same = fast.argmax[:steps].cpu() == slow.argmax[:steps].cpu()
    return dict(tokens_identical=fast.tokens == slow.tokens, compared_steps=steps,
                argmax_agreement=float(same.float().mean()), records_identical=bool(same.all()) and
                fast.argmax.shape == slow.argmax.shape)


def _exactness(suite: Suite) -> tuple[dict, dict]:
    length = suite.contexts["8K"]
    model = random_model(suite.small_config(), suite.device, torch.float64)
    prompt = random_ids(model.config.vocab_size, length - suite.new_tokens, suite.device, seed=1)[0].tolist()
    fast = _probe(model, prompt, suite.new_tokens)
    slow = _reference(model, prompt, suite.new_tokens)
    del model
    suite.empty_cache()
    agreement = _agreement(fast, slow)
    row = dict(trial="exactness", model="small random", dtype="float64", context="8K", prompt_tokens=len(prompt),
               **agreement)
    passed = agreement["tokens_identical"] and agreement["records_identical"]
    return row, check("probe == reference in float64 at 8K: same tokens, identical per-step argmax records", passed,
                      argmax_agreement=agreement["argmax_agreement"])


def _trial(suite: Suite, model, model_name: str, label: str, length: int) -> dict:
    prompt = random_ids(model.config.vocab_size, length - suite.new_tokens, suite.device, seed=2)[0].tolist()
    fast, probe_info = _timed(suite, _probe, model, prompt, suite.new_tokens)
    slow, reference_info = _timed(suite, _reference, model, prompt, suite.new_tokens)
    row = dict(trial="cost", model=model_name, dtype=str(model.dtype).replace("torch.", ""), context=label,
               prompt_tokens=len(prompt), new_tokens=suite.new_tokens,
               probe_s=probe_info["seconds"], probe_peak_mib=probe_info["peak_mib"],
               probe_extra_mib=probe_info["extra_mib"],
               reference_s=reference_info["seconds"], reference_peak_mib=reference_info["peak_mib"],
               reference_extra_mib=reference_info["extra_mib"])
    if slow is None:
        row["reference_error"] = reference_info["error"]
    else:
        row["speedup_vs_reference"] = reference_info["seconds"] / probe_info["seconds"]
        row.update(_agreement(fast, slow))
    return row


def run(suite: Suite) -> dict:
    row, exact = _exactness(suite)
    rows, checks = [row], [exact]
    model = suite.big_model()
    for label in ("8K", "32K"):
        rows.append(_trial(suite, model, "8B-shaped random" if not suite.tiny else "tiny random", label,
                           suite.contexts[label]))
    if suite.model_path:
        from transformers import AutoModelForCausalLM

        real = AutoModelForCausalLM.from_pretrained(suite.model_path, dtype=suite.dtype,
                                                    attn_implementation="sdpa").to(suite.device).eval()
        length = min(suite.contexts["8K"], real.config.max_position_embeddings)
        rows.append(_trial(suite, real, suite.model_path, "8K", length))
        del real
        suite.empty_cache()
    return dict(rows=rows, checks=checks, notes=[
        "cost trials: half precision, where argmax_agreement < 1 comes from ties among rounded attention weights "
        "(see the exactness row for the check)"])
