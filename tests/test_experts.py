"""Mixture of experts: per-expert factors against a brute force over the model's own eager experts computation.

The brute force runs the model with transformers' ``eager`` experts (the model's code, not ours), records every
``F.linear`` call on an expert's slice of the fused ``gate_up_proj`` / ``down_proj`` with its input and output
(gradient retained), and sums per expert over the labelled tokens routed to it: ``A_e`` from the inputs,
``G_e`` from the output gradients of the summed gold loss (so the routing weight, which multiplies after down,
is in ``G`` as the model computes it). Factors from ``collect_factors`` must match in fp64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kfac_edit.edit import EditSpec, apply_edit, restore
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.models import MOE_ARCHITECTURES, find_projections, projection_kinds

from test_architectures import random_batches, tiny_model


def eager_fp64(model_type: str):
    model = tiny_model(model_type).double()
    model.set_experts_implementation("eager")  # fp64 needs it (grouped_mm is fp32/bf16 only); the model's own code
    return model


def brute_force(model, block: int, batches, rows_out: dict | None = None):
    """``{(expert, kind): (A, G, rows)}`` of block ``block`` from the eager experts' own ``F.linear`` calls; with
    ``rows_out``, also ``{(expert, kind): [(input rows, output-gradient rows), ...]}`` there."""
    experts = model.model.layers[block].mlp.experts
    n_experts, inter = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
    sums: dict = {}
    for batch in batches:
        calls = []
        real_linear = F.linear

        def linear(x, weight, bias=None):
            out = real_linear(x, weight, bias)
            for e in range(n_experts):
                for kind, param in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
                    if weight.data_ptr() == param[e].data_ptr() and weight.shape == param[e].shape:
                        out.retain_grad()
                        calls.append((e, kind, x, out))
            return out

        routed = {}

        def record_routing(mod, args) -> None:
            routed["index"] = args[1]

        handle = experts.register_forward_pre_hook(record_routing)
        F.linear = torch.nn.functional.linear = linear
        try:
            logits = model(**batch).logits
        finally:
            F.linear = torch.nn.functional.linear = real_linear
            handle.remove()
        ids = batch["input_ids"]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        labelled = torch.ones_like(ids, dtype=torch.bool)
        labelled[:, -1] = False
        labelled = labelled.reshape(-1)
        for e, kind, x, out in calls:
            tokens = torch.where((routed["index"] == e).T)[1]  # the eager loop's token order: by slot, then token
            keep = labelled[tokens]
            a, g = x.detach()[keep], out.grad[keep]
            parts = {"gate": (a, g[:, :inter]), "up": (a, g[:, inter:])} if kind == "gate_up" else {"down": (a, g)}
            for k, (rows, grads) in parts.items():
                if rows_out is not None:
                    rows_out.setdefault((e, k), []).append((rows, grads))
                A, G, n = sums.get((e, k), (0, 0, 0))
                sums[e, k] = (A + rows.T @ rows, G + grads.T @ grads, n + int(keep.sum()))
    model.zero_grad(set_to_none=True)
    return sums


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_per_expert_factors_equal_a_brute_force_over_the_eager_experts(model_type):
    model = eager_fp64(model_type)
    batches = random_batches()
    expected = brute_force(model, 1, batches)
    factors = collect_factors(model, batches, layers=[1], labels="gold", progress=False)
    n_experts = model.model.layers[1].mlp.experts.gate_up_proj.shape[0]
    assert len(factors) == 3 * n_experts and len(expected) == 3 * n_experts  # every expert got tokens
    rows = {e: expected[e, "gate"][2] for e in range(n_experts)}
    assert sum(rows.values()) == 2 * 2 * 11 * 2  # 2 batches x 2 windows x 11 labelled positions x top-2
    assert len(set(rows.values())) > 1  # experts see different numbers of tokens
    for (e, kind), (A, G, n) in expected.items():
        mf = factors.modules[f"model.layers.1.mlp.experts.{e}.{kind}"]
        assert mf.activation_tokens == mf.grad_tokens == n
        torch.testing.assert_close(mf.activation_sum, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mf.grad_sum, G, rtol=1e-10, atol=1e-12)
        assert float(G.norm()) > 0
    gate, up = (factors.modules[f"model.layers.1.mlp.experts.0.{k}"] for k in ("gate", "up"))
    assert gate.activation_sum is up.activation_sum  # an expert's gate and up read the same rows: one A


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_per_expert_ekfac_equals_a_brute_force_and_edits(model_type):
    """EK-FAC per expert: Σ over its routed labelled rows of (U_Gᵀ g)²(U_Aᵀ a)², in its own eigenbasis; then
    ``--method ekfac`` edits the experts and ``predict`` scores them."""
    from kfac_edit.curvature import eigendecompose
    from kfac_edit.factors.ekfac import collect_ekfac
    from kfac_edit.predict import predict_cost

    model = eager_fp64(model_type)
    batches = random_batches()
    rows: dict = {}
    brute_force(model, 1, batches, rows_out=rows)
    factors = collect_factors(model, batches, layers=[1], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, batches, labels="gold", progress=False)
    assert len(ekfac.modules) == len(rows) == len(factors)
    for (e, kind), parts in rows.items():
        name = f"model.layers.1.mlp.experts.{e}.{kind}"
        a, g = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ug = eigendecompose(factors.grad_cov(name)).vectors
        ua = eigendecompose(factors.activation_cov(name)).vectors
        m = ekfac.modules[name]
        assert m.tokens == a.shape[0] == factors.modules[name].grad_tokens
        torch.testing.assert_close(m.pair_sum, (g @ ug).square().T @ (a @ ua).square(), rtol=1e-10, atol=1e-12)
    spec = EditSpec({(1, "up"): 0.5}, method="ekfac")
    own = predict_cost(model, factors, spec, {"own": batches}, mode="curvature", ekfac=ekfac)[0]
    report = apply_edit(model, factors, spec, ekfac=ekfac)
    assert len(report.modules) == model.model.layers[1].mlp.experts.gate_up_proj.shape[0]
    assert all(0.5 <= r.mass_fraction < 1 and r.weight_change > 0 for r in report.modules)
    for r in report.modules:  # predict on the factors' own data: the EK-FAC mass the edit removes
        assert abs(own.modules[r.name] - (1 - r.mass_fraction)) < 1e-9
    restore(model)


def test_bsn_learns_masks_of_routed_experts():
    """--method bsn on experts: the masked fused parameters enter the forward (the masks move with the learning
    rate), and the edit writes W ⊙ M into the targets' slices of the fused tensors only."""
    from dataclasses import replace

    from kfac_edit.bsn import BsnConfig, BsnData, BsnInputs, learn_masks
    from kfac_edit.experts import expert_weight

    model = eager_fp64("olmoe")
    g = torch.Generator().manual_seed(0)
    data = BsnData(forget=[torch.randint(1, 60, (12,), generator=g).tolist() for _ in range(4)],
                   clean=[torch.randint(1, 60, (12,), generator=g).tolist() for _ in range(4)])  # fmt: skip
    targets = [(p, 0.5) for p in find_projections(model, layers=[1], projections=["up", "down"])]
    assert len(targets) == 8 and all(p.expert is not None for p, _ in targets)
    config = BsnConfig(epochs=2, batch_size=4)
    # a random tiny model's loss barely depends on any one entry: a huge step makes every expert's ranking move
    moving = learn_masks(model, targets, data, replace(config, lr=1e5, weight_decay=0.0), progress=False)
    frozen = learn_masks(model, targets, data, replace(config, lr=1e-12), progress=False)  # ~ the initial scores
    assert all(not torch.equal(moving[p.name], frozen[p.name]) for p, _ in targets)  # every expert got gradients
    expected = learn_masks(model, targets, data, config, progress=False)  # seeded: the edit's own masks
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    views = {p.name: p.module.weight.detach().clone() for p, _ in targets}
    report = apply_edit(model, None, EditSpec({(1, "up"): 0.5, (1, "down"): 0.5}, method="bsn"),
                        bsn=BsnInputs(data, config))  # fmt: skip
    assert len(report.modules) == 8
    changed = {n for n, t in model.named_parameters() if not torch.equal(t, before[n])}
    assert changed == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
    for p, _ in targets:
        assert torch.equal(expert_weight(model, p.name), views[p.name] * expected[p.name])
    gate = expert_weight(model, "model.layers.1.mlp.experts.0.gate")
    inter = gate.shape[0]
    assert torch.equal(gate, before["model.layers.1.mlp.experts.gate_up_proj"][0, :inter])  # not a target
    restore(model)
    assert all(torch.equal(t, before[n]) for n, t in model.named_parameters())


@pytest.mark.parametrize("model_type", sorted(MOE_ARCHITECTURES))
def test_moe_collect_edit_save_reload_changes_only_the_requested_blocks_experts(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    original_dir = tmp_path / "original"
    model.save_pretrained(original_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert projection_kinds(model) == ["gate", "up", "down"]
    factors = collect_factors(model, random_batches(), layers=[1], progress=False)
    apply_edit(model, factors, EditSpec({(1, "gate"): 0.5, (1, "down"): 0.5}))  # all experts of block 1; no up
    model.save_pretrained(tmp_path / "edited")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).state_dict()
    changed = {k for k, v in original.items() if k in state and not torch.equal(state[k], v)}
    experts = MOE_ARCHITECTURES[model_type][1]
    expected = {f"model.layers.1.{experts}.gate_up_proj", f"model.layers.1.{experts}.down_proj"}
    if model_type in ("qwen2_moe", "qwen3_next"):  # the shared expert is an ordinary MLP of the block
        expected |= {"model.layers.1.mlp.shared_expert.gate_proj.weight", "model.layers.1.mlp.shared_expert.down_proj.weight"}
    assert changed == expected
    name = f"model.layers.1.{experts}.gate_up_proj"
    inter = original[name].shape[1] // 2
    assert torch.equal(state[name][:, inter:], original[name][:, inter:])  # up rows untouched
    assert all((state[name][e, :inter] - original[name][e, :inter]).abs().max() > 1e-4 for e in range(4))  # every gate
    assert not any("mlp.gate.weight" in k for k in changed)  # the router is never edited
    restore(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_collecting_experts_with_gradient_checkpointing_is_refused():
    model = tiny_model("olmoe")
    with pytest.raises(UserError, match="--gradient-checkpointing cannot be combined with per-expert factors"):
        collect_factors(model, random_batches(), layers=[1], gradient_checkpointing=True, progress=False)


def test_the_memory_plan_counts_factors_per_expert():
    from kfac_edit.factors.memory import module_memory

    model = tiny_model("olmoe")
    memory = module_memory(find_projections(model, layers=[0]))
    assert len(memory) == 3 * 4
    d, inter, size = 16, 32, 4  # fp32 sums: A_e (d x d) shared by gate/up, G (I x I) each; down A (I x I), G (d x d)
    assert sum(m.total for m in memory) == 4 * size * (d * d + 2 * inter * inter + inter * inter + d * d)
    from kfac_edit.factors.memory import memory_plan

    table = memory_plan(find_projections(model, layers=[0])).table()
    assert "gate  32x16 on cpu: A 1.00 KiB + G 4.00 KiB = 5.00 KiB per expert, blocks 0 (4 experts, 20.00 KiB)" in table, table


@pytest.mark.parametrize("model_type", sorted(MOE_ARCHITECTURES))
def test_the_tapped_experts_compute_what_the_model_computes(model_type):
    """The expert-by-expert forward used while collecting gives the logits of the model's own eager experts."""
    from kfac_edit.experts import tap_experts

    model = eager_fp64(model_type)
    batch = random_batches()[0]
    with torch.no_grad():
        own = model(**batch, use_cache=False).logits
        experts_path = MOE_ARCHITECTURES[model_type][1]
        taps = []
        for block in model.model.layers:
            try:
                taps.append(tap_experts(block.get_submodule(experts_path), lambda: True, lambda *a: None))
            except AttributeError:
                pass
        assert taps
        tapped = model(**batch, use_cache=False).logits
        for tap in taps:
            tap.remove()
        again = model(**batch, use_cache=False).logits
    torch.testing.assert_close(tapped, own, rtol=1e-12, atol=1e-12)
    assert torch.equal(again, own)


def test_an_expert_layout_that_cannot_be_read_is_one_line_naming_it():
    model = tiny_model("olmoe")
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(UserError) as info:
        find_projections(model, layers=[1])
    assert str(info.value) == (
        "OlmoeExperts at model.layers.1.mlp.experts has is_transposed=True; kfac-edit's per-expert factors support "
        "the [gate; up] (out, in) layout without bias or post-expert norm only"
    )


def test_the_per_expert_layers_json_form_overrides_the_blocks_keep_mass():
    from kfac_edit.edit import resolve_targets

    model = tiny_model("olmoe")
    layers = {"1": {"gate": 0.5, "experts": {"2": {"gate": 0.9}, "3": {"gate": 1.0, "down": 0.25}}}}
    spec = EditSpec.from_json(layers)
    targets = {p.name.removeprefix("model.layers.1.mlp.experts."): keep for p, keep in resolve_targets(model, spec)}
    assert targets == {"0.gate": 0.5, "1.gate": 0.5, "2.gate": 0.9, "3.down": 0.25}  # expert 3's gate: not edited
    assert EditSpec.from_json(spec.to_dict()).to_dict() == spec.to_dict()
    assert spec.to_dict()["layers"] == layers
    only = EditSpec.from_json({"0": {"experts": {"1": {"up": 0.5}}}})
    assert [p.name for p, _ in resolve_targets(model, only)] == ["model.layers.0.mlp.experts.1.up"]
    with pytest.raises(UserError, match="^block 0 has no routed expert 7"):
        resolve_targets(model, EditSpec.from_json({"0": {"experts": {"7": {"up": 0.5}}}}))
    with pytest.raises(UserError, match="expert key 'x' is not an expert index"):
        EditSpec.from_json({"0": {"experts": {"x": {"up": 0.5}}}})
