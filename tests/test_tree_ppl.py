"""`tree-ppl` on the Quest protocol: per-token NLL against transformers' own logits, rows within the budget exact,
dense layers covering every layer exact, and the command end to end on a tiny model with the real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from selective_attention.cli import main
from selective_attention.modeling import cache_kwargs
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel, evaluation
from selective_attention.tree_kernel.evaluation import (
    approximated_layers,
    evaluate,
    past_budget_rows,
    token_nll,
    tail_nll,
)

from .conftest import build_tiny, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, embedded_model_dir):
    """A 2-layer random Llama with the embedded tokenizer's vocabulary, saved with that tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = build_tiny(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512))
    path = tmp_path_factory.mktemp("tiny_tokenized")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_token_nll_equals_cross_entropy_of_the_model_logits(monkeypatch):
    model = build_tiny(tiny_llama_config())
    ids = torch.randint(3, 128, (41,))
    monkeypatch.setattr(evaluation, "LOGIT_ROWS", 7)  # several chunks of the output projection
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_past_budget_rows():
    rows = past_budget_rows(10, 4)  # row p predicts token p + 1 from p + 1 keys
    assert rows.tolist() == [False] * 4 + [True] * 5


@pytest.mark.parametrize("method", ["topk", "bound", "rescore"])
def test_rows_within_the_budget_are_exact_and_dense_layers_everywhere_is_dense(method):
    model = build_tiny(tiny_llama_config())
    ids = torch.randint(3, 128, (60,))
    dense = evaluate(model, [ids], None, None)["nll"][0]
    config = TreeKernelConfig(method=method, budget=12, min_keys=1, leaf_block=4)
    approx = evaluate(model, [ids], config, 12)["nll"][0]
    assert approx[:12] == pytest.approx(dense[:12], abs=1e-4)  # rows seeing <= 12 keys
    assert max(abs(a - b) for a, b in zip(approx[12:], dense[12:])) > 1e-3  # the rest really approximated
    everything_dense = TreeKernelConfig(method=method, budget=12, min_keys=1, leaf_block=4,
                                        layers=approximated_layers(model, [0, 1]))
    assert evaluate(model, [ids], everything_dense, 12)["nll"][0] == pytest.approx(dense, abs=1e-5)


def test_dense_layers_must_exist():
    with pytest.raises(ValueError, match="do not exist"):
        approximated_layers(build_tiny(tiny_llama_config()), [5])


def test_cli_quest_protocol(tiny_checkpoint, tmp_path):
    output = tmp_path / "ppl"
    assert main(["tree-ppl", "--model", str(tiny_checkpoint), "--context", "96", "--budgets", "16", "32",
                 "--dense-layers", "0", "--leaf-blocks", "4", "--methods", "dense", "topk", "bound", "rescore",
                 "alignment", "--output", str(output)]) == 0
    results = json.loads(output.with_suffix(".json").read_text())["results"]
    nll = json.loads((tmp_path / "ppl_nll.json").read_text())
    assert set(results) == {"dense", "topk@16", "topk@32", "bound/b4/mean@16", "bound/b4/mean@32",
                            "rescore/b4/x4/kv_group/mean@16", "rescore/b4/x4/kv_group/mean@32", "alignment@16",
                            "alignment@32"}
    for name, row in results.items():
        if row["budget"] is not None:  # rows within the budget equal dense, whatever the method
            assert nll[name][0][:row["budget"]] == pytest.approx(nll["dense"][0][:row["budget"]], abs=1e-3), name
            if not name.startswith("bound"):  # bound rounds to whole blocks (and forces two)
                assert row["costs"]["past_budget"]["exact"] <= row["budget"] + 1e-6, name
    assert results["rescore/b4/x4/kv_group/mean@16"]["costs"]["past_budget"]["rescored"] > 16
    assert "| topk@16 | 16 |" in output.with_suffix(".md").read_text()
    assert output.with_suffix(".png").stat().st_size > 0


def test_cli_refuses_unknown_dense_layer(tiny_checkpoint, tmp_path):
    assert main(["tree-ppl", "--model", str(tiny_checkpoint), "--dense-layers", "7", "--context", "32",
                 "--output", str(tmp_path / "x")]) == 2


def test_cli_ranks_name_the_rows_and_keep_the_default_names(tiny_checkpoint, tmp_path):
    output = tmp_path / "ranks"
    assert main(["tree-ppl", "--model", str(tiny_checkpoint), "--context", "64", "--budgets", "16",
                 "--dense-layers", "0", "--leaf-blocks", "4", "--methods", "rescore", "--ranks", "bound", "mix",
                 "--output", str(output)]) == 0
    results = json.loads(output.with_suffix(".json").read_text())["results"]
    assert set(results) == {"rescore/b4/x4/kv_group/mean@16", "rescore/b4/x4/kv_group/mean/rank-mix@16"}
    assert results["rescore/b4/x4/kv_group/mean/rank-mix@16"]["config"]["rank"] == "mix"


def test_cli_refuses_an_output_from_other_settings_and_keeps_it(tmp_path, caplog):
    output = tmp_path / "ppl"
    saved = '{"settings": {"context": 4096}, "results": {"dense": {"ppl": 9.0}}}\n'
    output.with_suffix(".json").write_text(saved)
    # the model path does not exist: the refusal comes first, before any loading
    assert main(["tree-ppl", "--model", str(tmp_path / "no-model"), "--context", "64", "--output", str(output)]) == 2
    assert "other settings (context: 4096 there, 64 here" in caplog.text
    assert output.with_suffix(".json").read_text() == saved


def test_cli_rerun_with_the_same_settings_adds_rows_and_keeps_the_measured_ones(tiny_checkpoint, tmp_path):
    output = tmp_path / "ppl"
    flags = ["tree-ppl", "--model", str(tiny_checkpoint), "--context", "48", "--budgets", "16", "--dense-layers",
             "0", "--leaf-blocks", "4", "--output", str(output)]
    assert main(flags + ["--methods", "dense", "topk"]) == 0
    first = json.loads(output.with_suffix(".json").read_text())["results"]
    assert main(flags + ["--methods", "dense", "topk", "bound"]) == 0
    second = json.loads(output.with_suffix(".json").read_text())["results"]
    assert set(second) == set(first) | {"bound/b4/mean@16"}
    assert {name: second[name] for name in first} == first  # seconds included: not measured again


def test_dense_prefix_scores_the_last_rows_as_the_full_forward_does():
    model = build_tiny(tiny_llama_config())
    ids = torch.randint(3, 128, (50,))
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")[30:]
    torch.testing.assert_close(tail_nll(model, ids, None, dense_prefix=30), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["topk", "bound", "rescore"])
def test_dense_prefix_rows_under_the_kernel_equal_a_token_by_token_decode(method):
    """The scored rows after a dense prefill = decoding them one by one under the kernel (absolute positions)."""
    model = build_tiny(tiny_llama_config())
    ids, prefix = torch.randint(3, 128, (60,)), 36
    config = TreeKernelConfig(method=method, budget=12, min_keys=1, leaf_block=4)
    got = tail_nll(model, ids, config, dense_prefix=prefix)
    configure_tree_kernel(model, None)
    cache = DynamicCache(config=model.config)
    expected = []
    with torch.no_grad():
        model(ids[None, :prefix], **cache_kwargs(cache), use_cache=True)
        configure_tree_kernel(model, config)
        for position in range(prefix, ids.numel() - 1):
            logits = model(ids[None, position:position + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1]
            expected.append(torch.nn.functional.cross_entropy(logits, ids[position + 1]))
    configure_tree_kernel(model, None)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-4)
    assert (got - tail_nll(model, ids, None, dense_prefix=prefix)).abs().max() > 1e-3  # really approximated


def test_cli_score_last(tiny_checkpoint, tmp_path):
    output = tmp_path / "last"
    assert main(["tree-ppl", "--model", str(tiny_checkpoint), "--context", "64", "--score-last", "24", "--budgets",
                 "16", "--dense-layers", "0", "--leaf-blocks", "4", "--methods", "dense", "topk",
                 "--output", str(output)]) == 0
    saved = json.loads(output.with_suffix(".json").read_text())
    nll = json.loads((tmp_path / "last_nll.json").read_text())
    assert saved["settings"]["score_last"] == 24 and len(nll["topk@16"][0]) == len(nll["dense"][0]) == 23
    assert saved["results"]["topk@16"]["past_budget_tokens"] == 23  # every scored row sees more than 16 keys
    markdown = output.with_suffix(".md").read_text()
    assert "the last 24 scored" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| topk@16 |")).split(" | ")
    # the report (from the saved NLL, rounded to 1e-4) takes the scored rows as past the budget, as the run did
    assert float(row[3]) == pytest.approx(saved["results"]["topk@16"]["ppl_past_budget"], rel=1e-4)
    assert main(["tree-ppl", "--model", str(tiny_checkpoint), "--context", "64", "--score-last", "65",
                 "--output", str(tmp_path / "bad")]) == 2
