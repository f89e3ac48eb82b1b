"""Architecture matrix: every dense family in ``models.ARCHITECTURES`` goes collect -> edit -> save -> reload.

For each family a tiny random model is built in code (hidden 16, two blocks), factors are collected on random
tokens with :func:`collect_factors`, block 1's projections are edited with :func:`apply_edit`, the model is saved
with ``save_pretrained`` and read back with ``from_pretrained``: exactly the edited weights differ from the
original checkpoint, and those changed (with their biases: ``--bias joint`` is the default). Mixture-of-experts families are in tests/test_experts.py; those whose experts cannot be read are refused with one
line naming the experts.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kfac_edit.edit import EditSpec, apply_edit
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.models import ARCHITECTURES, FUSED_GATE_UP, find_projections, projection_kinds

VOCAB = 64
# Tiny sizes under every name the configs use (a config ignores the names it does not have).
TINY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "ffn_dim": 32,
    "n_inner": 32,
    "ffn_hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rotary_dim": 4,
}
MOE_FAMILIES = ("gpt_oss", "jetmoe")  # experts kfac-edit cannot read (served ones: models.MOE_ARCHITECTURES)
# Multimodal families: tiny sub-configs (their defaults are full-size vision towers, gigabytes of random weights).
NESTED = {
    "gemma3": {
        "text_config": {k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim")}
        | {"num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300, "pad_token_id": 0},
        "vision_config": {
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 28, "patch_size": 14,
        },
        "mm_tokens_per_image": 4, "boi_token_index": 297, "eoi_token_index": 298, "image_token_index": 299,
    },
}  # fmt: skip


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type in NESTED:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **NESTED[model_type])).eval()
    defaults = AutoConfig.for_model(model_type)
    sizes = dict(TINY, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=32)
    known = {k: v for k, v in sizes.items() if hasattr(defaults, k) or k in getattr(defaults, "attribute_map", {})}
    if isinstance(getattr(type(defaults), "head_dim", None), property):  # Falcon derives it
        known.pop("head_dim")
    if model_type == "gpt_neo":  # its layer pattern must cover exactly num_layers blocks
        known["attention_types"] = [[["global", "local"], 1]]
    config = AutoConfig.for_model(model_type, **known)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config).eval()


def random_batches(seed: int = 0, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(2, 12, dtype=torch.long)
    return [{"input_ids": torch.randint(1, VOCAB, (2, 12), generator=g), "attention_mask": ones} for _ in range(n)]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_collect_edit_save_reload_changes_only_the_edited_weights(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    assert model.config.model_type == model_type
    original_dir = tmp_path / "original"
    model.save_pretrained(original_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = projection_kinds(model)
    assert kinds[-1] == "down" and "up" in kinds
    assert ("gate" not in kinds) == (model_type in FUSED_GATE_UP or ARCHITECTURES[model_type][1].get("gate") is None)

    factors = collect_factors(model, random_batches(), layers=[1], progress=False)
    edited = {(1, kind): 0.5 for kind in kinds}
    apply_edit(model, factors, EditSpec(keep_mass=edited))
    model.save_pretrained(tmp_path / "edited")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    state = reloaded.state_dict()

    found = find_projections(model, layers=[1], projections=kinds)
    edited_weights = {f"{p.name}.weight" for p in found}
    edited_biases = {f"{p.name}.bias" for p in found if p.has_bias}  # --bias joint (the default): [W b] edited
    changed = {k for k, v in original.items() if k in state and not torch.equal(state[k], v)}
    assert changed == edited_weights | edited_biases
    assert set(original) - set(state) <= {k for k in original if "lm_head" in k or "embed_out" in k}  # tied heads
    for name in edited_weights:
        assert (state[name] - original[name]).abs().max() > 1e-4, name  # keep_mass 0.5 changes the weight visibly


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_mixture_of_experts_is_refused_with_one_line(model_type):
    model = tiny_model(model_type)
    with pytest.raises(UserError) as info:
        find_projections(model)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"mixture-of-experts model '{model_type}' is not supported yet")
    assert "experts" in message and "3-D" in message and "not linear layers" in message


def test_cli_on_a_mixture_of_experts_model_is_one_line_exit_2(tmp_path, tiny_tokenizer, tiny_corpus_jsonl, capsys):
    from kfac_edit.cli import main

    model_dir = tmp_path / "tiny-gpt-oss"
    tiny_model("gpt_oss").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    capsys.readouterr()  # transformers' own save messages
    argv = ["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(tmp_path / "f")]
    assert main(argv + ["--tokens", "64", "--seq-len", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kfac-edit: error: mixture-of-experts model 'gpt_oss' is not supported")
    assert "--modules up=" not in err[0]  # no advice that cannot work
    assert not (tmp_path / "f").exists()


def test_load_model_dtype_auto_keeps_a_bf16_checkpoint_bf16_on_cpu(tmp_path, tiny_tokenizer):
    from kfac_edit.models import load_model

    model_dir = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    model, _ = load_model(str(model_dir), device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(model_dir), dtype="float64", device="cpu")
    assert next(model.parameters()).dtype == torch.float64


def _cli_dir(tmp_path, model_type, tokenizer, capsys):
    model_dir = tmp_path / f"tiny-{model_type}"
    tiny_model(model_type).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()  # transformers' own save messages
    return model_dir


def _changed_params(model_dir, edited_dir) -> set[str]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        after = AutoModelForCausalLM.from_pretrained(edited_dir, dtype=torch.float32).state_dict()
    return {k for k, v in before.items() if not torch.equal(after[k], v)}


COLLECT = ["--tokens", "96", "--seq-len", "16", "--batch-size", "2", "--layers", "1", "--no-progress", "--device", "cpu"]


def test_modules_travel_with_the_factors_from_collect_to_edit_on_the_cli(tmp_path, tiny_tokenizer, tiny_corpus_jsonl, capsys):
    """GPT-J collected at paths no table names (an attention projection as 'up'): ``edit`` finds them in the
    manifest without --modules, accepts the same --modules, and refuses other ones in one line."""
    from kfac_edit.cli import main
    from kfac_edit.factors.store import Factors

    model_dir = _cli_dir(tmp_path, "gptj", tiny_tokenizer, capsys)
    factors = tmp_path / "factors"
    modules = "up=attn.q_proj,down=mlp.fc_out"
    argv = ["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(factors)]
    assert main(argv + COLLECT + ["--modules", modules]) == 0
    manifest = Factors.load(factors, names=[]).manifest
    assert manifest["module_paths"] == {"blocks": "transformer.h", "up": "attn.q_proj", "down": "mlp.fc_out"}
    assert manifest["model"] == str(model_dir.resolve())  # a local model as a resolved path
    layers = '{"1": {"up": 0.5, "down": 0.5}}'
    edit = ["edit", "--model", str(model_dir), "--factors", str(factors), "--layers-json", layers, "--device", "cpu"]
    assert main(edit + ["--out", str(tmp_path / "e1")]) == 0
    assert _changed_params(model_dir, tmp_path / "e1") == {
        "transformer.h.1.attn.q_proj.weight", "transformer.h.1.mlp.fc_out.weight", "transformer.h.1.mlp.fc_out.bias"
    }  # fmt: skip
    assert main(edit + ["--out", str(tmp_path / "e2"), "--modules", modules]) == 0
    assert _changed_params(model_dir, tmp_path / "e2") == _changed_params(model_dir, tmp_path / "e1")
    capsys.readouterr()
    assert main(edit + ["--out", str(tmp_path / "e3"), "--modules", "up=mlp.fc_in,down=mlp.fc_out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--modules up=mlp.fc_in,down=mlp.fc_out disagrees with the modules" in err[0]
    assert "(up=attn.q_proj,down=mlp.fc_out)" in err[0]
    assert not (tmp_path / "e3").exists()


@pytest.mark.parametrize("model_type", ["falcon", "gptj"])
def test_falcon_and_gptj_collect_and_edit_through_the_cli(model_type, tmp_path, tiny_tokenizer, tiny_corpus_jsonl, capsys):
    from kfac_edit.cli import main

    model_dir = _cli_dir(tmp_path, model_type, tiny_tokenizer, capsys)
    factors = tmp_path / "factors"
    argv = ["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(factors)]
    assert main(argv + COLLECT) == 0
    layers = '{"1": {"up": 0.5, "down": 0.5}}'
    edit = ["edit", "--model", str(model_dir), "--factors", str(factors), "--layers-json", layers, "--device", "cpu"]
    assert main(edit + ["--out", str(tmp_path / "edited")]) == 0
    up, down = ("dense_h_to_4h", "dense_4h_to_h") if model_type == "falcon" else ("fc_in", "fc_out")
    expected = {f"transformer.h.1.mlp.{up}.weight", f"transformer.h.1.mlp.{down}.weight"}
    if model_type == "gptj":  # biased fc_in/fc_out: [W b] edited (--bias joint, the default)
        expected |= {f"transformer.h.1.mlp.{up}.bias", f"transformer.h.1.mlp.{down}.bias"}
    assert _changed_params(model_dir, tmp_path / "edited") == expected
    assert main(edit + ["--out", str(tmp_path / "kept"), "--bias", "keep"]) == 0
    assert _changed_params(model_dir, tmp_path / "kept") == {n for n in expected if n.endswith(".weight")}


@pytest.mark.parametrize(
    "modules, expected",
    [
        ("up=mlp.act,down=mlp.fc_out", "--modules up=mlp.act: transformer.h.0.mlp.act is a NewGELUActivation, not a linear layer"),
        ("up=mlp.fc_in,down=mlp.nope", "block 0 has no module 'mlp.nope' (--modules down=mlp.nope, blocks in transformer.h)"),
    ],
)
def test_modules_naming_a_non_linear_or_missing_module_is_one_line_exit_2(modules, expected, tmp_path, tiny_tokenizer, tiny_corpus_jsonl, capsys):
    from kfac_edit.cli import main

    model_dir = _cli_dir(tmp_path, "gptj", tiny_tokenizer, capsys)
    argv = ["collect", "--model", str(model_dir), "--data", str(tiny_corpus_jsonl), "--out", str(tmp_path / "f")]
    assert main(argv + COLLECT + ["--modules", modules]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "f").exists()
    edit = ["edit", "--model", str(model_dir), "--method", "svd", "--layers-json", '{"1": {"up": 0.5}}']
    assert main(edit + ["--modules", modules, "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_module_missing_in_some_block_is_named(tmp_path):
    from kfac_edit.models import use_modules

    model = tiny_model("gptj")
    del model.transformer.h[1].mlp.fc_in
    with pytest.raises(UserError, match=r"^block 1 has no module 'mlp.fc_in' \(--modules up=mlp.fc_in, blocks in transformer.h\)"):
        use_modules(model, {"up": "mlp.fc_in"})
