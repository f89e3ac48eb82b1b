"""Biased projections: the homogeneous coordinate (``--bias joint``, the default) against brute force.

GPT-2 (``Conv1D`` ``c_fc``/``c_proj``, weight stored ``(in, out)``) and GPT-NeoX (``nn.Linear`` with bias), fp64:
``A`` equals ``Σ [a; 1][a; 1]ᵀ`` over the hooked inputs of the labelled positions, ``G`` the Gram of the autograd
gradient of the summed loss w.r.t. the layer output; the edit projects ``[W b]`` as one matrix, and ``--bias keep``
leaves the bias bit for bit while editing ``W`` from ``A``'s top-left block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kfac_edit.curvature import eigendecompose, project_weight, select_pairs
from kfac_edit.edit import EditSpec, apply_edit, restore
from kfac_edit.factors.collect import collect_factors
from kfac_edit.models import find_projections, projection_kinds

from test_architectures import random_batches, tiny_model

CASES = {"gpt2": "transformer.h.1.mlp.c_fc", "gpt_neox": "gpt_neox.layers.1.mlp.dense_h_to_4h"}


def rows_of(model, name, batches):
    """``([a; 1] rows, output-gradient rows)`` of module ``name`` at the labelled positions, gold labels."""
    module = model.get_submodule(name)
    acts, grads = [], []
    for batch in batches:
        seen = {}

        def hook(mod, args, out):
            seen["a"] = args[0]
            out.retain_grad()
            seen["out"] = out

        handle = module.register_forward_hook(hook)
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            handle.remove()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                        reduction="sum").backward()  # fmt: skip
        a = seen["a"][:, :-1].reshape(-1, seen["a"].shape[-1]).detach()
        acts.append(torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1))
        grads.append(seen["out"].grad[:, :-1].reshape(-1, seen["out"].shape[-1]))
    model.zero_grad(set_to_none=True)
    return torch.cat(acts), torch.cat(grads)


def brute_force(model, name, batches):
    """``(Σ [a; 1][a; 1]ᵀ, Σ g gᵀ, rows)`` of module ``name`` over the labelled positions with gold labels."""
    acts, grads = rows_of(model, name, batches)
    return acts.T @ acts, grads.T @ grads, acts.shape[0]


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_biased_factors_are_over_the_homogeneous_input_and_the_edit_projects_w_and_b(model_type):
    name = CASES[model_type]
    model = tiny_model(model_type).double()
    batches = random_batches()
    act, grad, rows = brute_force(model, name, batches)

    factors = collect_factors(model, batches, layers=[1], labels="gold", progress=False)
    mf = factors.modules[name]
    proj = next(p for p in find_projections(model, layers=[1], projections=projection_kinds(model)) if p.name == name)
    out_dim, in_dim = proj.shape
    assert proj.homogeneous and mf.shape == (out_dim, in_dim + 1) and act.shape == (in_dim + 1, in_dim + 1)
    assert mf.activation_tokens == rows
    torch.testing.assert_close(mf.activation_sum, act, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mf.grad_sum, grad, rtol=1e-10, atol=1e-8)
    assert factors.manifest["bias"] == "joint"

    weight, bias = proj.weight().detach().clone(), proj.module.bias.detach().clone()
    affine = torch.cat([weight, bias[:, None]], dim=1)
    grad_eig, act_eig = eigendecompose(grad / rows), eigendecompose(act / rows)
    expected = project_weight(affine, grad_eig, act_eig, select_pairs(grad_eig.values, act_eig.values, 0.5))
    kind = proj.kind
    report = apply_edit(model, factors, EditSpec({(1, kind): 0.5}))
    assert report.modules[0].bias and report.modules[0].shape == (out_dim, in_dim + 1)
    torch.testing.assert_close(proj.weight(), expected[:, :-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(proj.module.bias, expected[:, -1], rtol=1e-9, atol=1e-12)
    assert (proj.module.bias - bias).abs().max() > 1e-6  # the bias moved with the weight

    # --bias keep at edit time: W from A's top-left block (A over a alone), the bias untouched
    a_eig = eigendecompose(act[:-1, :-1] / rows)
    expected_w = project_weight(weight, grad_eig, a_eig, select_pairs(grad_eig.values, a_eig.values, 0.5))
    report = apply_edit(model, factors, EditSpec({(1, kind): 0.5}, bias="keep"))
    assert not report.modules[0].bias and report.modules[0].shape == (out_dim, in_dim)
    assert torch.equal(proj.module.bias, bias)
    torch.testing.assert_close(proj.weight(), expected_w, rtol=1e-9, atol=1e-12)
    restore(model)
    assert torch.equal(proj.weight(), weight) and torch.equal(proj.module.bias, bias)


def test_collect_with_bias_keep_gives_the_plain_factor_and_a_weight_only_edit():
    name = CASES["gpt2"]
    model = tiny_model("gpt2").double()
    batches = random_batches()
    act, _, rows = brute_force(model, name, batches)
    factors = collect_factors(model, batches, layers=[1], labels="gold", bias="keep", progress=False)
    torch.testing.assert_close(factors.modules[name].activation_sum, act[:-1, :-1], rtol=1e-10, atol=1e-10)
    assert factors.manifest["bias"] == "keep"
    proj = next(p for p in find_projections(model, layers=[1], projections=projection_kinds(model)) if p.name == name)
    bias = proj.module.bias.detach().clone()
    report = apply_edit(model, factors, EditSpec({(1, "up"): 0.5}))  # default joint, but the factors are over a
    assert not report.modules[0].bias and torch.equal(proj.module.bias, bias)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_ekfac_of_a_biased_layer_is_over_the_homogeneous_input(model_type):
    """EK-FAC of ``[W b]``: Σ_t (U_Gᵀ g_t)² (U_Aᵀ [a_t; 1])² by brute force; ``--method ekfac`` edits W and b, and
    ``predict`` on the factors' own data gives the mass the edit removes; ``--bias keep`` is refused in one line."""
    from kfac_edit.errors import UserError
    from kfac_edit.factors.ekfac import collect_ekfac
    from kfac_edit.predict import predict_cost

    name = CASES[model_type]
    model = tiny_model(model_type).double()
    batches = random_batches()
    factors = collect_factors(model, batches, layers=[1], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, batches, names=[name], labels="gold", progress=False)
    acts, grads = rows_of(model, name, batches)
    grad_eig, act_eig = eigendecompose(factors.grad_cov(name)), eigendecompose(factors.activation_cov(name))
    expected = ((grads @ grad_eig.vectors).square().T @ (acts @ act_eig.vectors).square())
    m = ekfac.modules[name]
    proj = next(p for p in find_projections(model, layers=[1], projections=projection_kinds(model)) if p.name == name)
    assert m.shape == (proj.shape[0], proj.shape[1] + 1) and m.tokens == acts.shape[0] == 44
    torch.testing.assert_close(m.pair_sum, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ekfac.activation_energy(name), act_eig.values, rtol=1e-10, atol=1e-12)

    spec = EditSpec({(1, proj.kind): 0.5}, method="ekfac")
    own = predict_cost(model, factors, spec, {"own": batches}, mode="curvature", ekfac=ekfac)[0]
    bias = proj.module.bias.detach().clone()
    report = apply_edit(model, factors, spec, ekfac=ekfac)
    record = report.modules[0]
    assert record.bias and record.shape == (proj.shape[0], proj.shape[1] + 1)
    assert not torch.equal(proj.module.bias, bias)
    assert abs(own.modules[name] - (1 - record.mass_fraction)) < 1e-9
    restore(model)
    with pytest.raises(UserError, match=r"over \[a; 1\].*--bias keep"):
        apply_edit(model, factors, EditSpec({(1, proj.kind): 0.5}, method="ekfac", bias="keep"), ekfac=ekfac)
    assert torch.equal(proj.module.bias, bias)


def test_protect_factors_follow_the_bias_mode_of_the_edit():
    """--protect factors over [a; 1] are cut to a with the edit's under --bias keep, giving exactly the edit with
    --bias keep protect factors; a joint edit with keep protect factors (or the reverse) is one line."""
    from kfac_edit.edit import Protection
    from kfac_edit.errors import UserError

    name = CASES["gpt2"]
    model = tiny_model("gpt2").double()
    factors = collect_factors(model, random_batches(), layers=[1], labels="gold", progress=False)
    joint = collect_factors(model, random_batches(seed=3), layers=[1], labels="gold", progress=False)
    keep = collect_factors(model, random_batches(seed=3), layers=[1], labels="gold", bias="keep", progress=False)
    module = model.get_submodule(name)
    bias = module.bias.detach().clone()

    report = apply_edit(model, factors, EditSpec({(1, "up"): 0.5}), protect=Protection(joint))
    assert report.modules[0].bias and not torch.equal(module.bias, bias)
    restore(model)
    edited = {}
    for label, protect in (("joint", joint), ("keep", keep)):
        report = apply_edit(model, factors, EditSpec({(1, "up"): 0.5}, bias="keep"), protect=Protection(protect))
        assert not report.modules[0].bias and torch.equal(module.bias, bias)
        edited[label] = (module.weight.detach().clone(), report.modules[0].protected_mass_fraction)
        restore(model)
    torch.testing.assert_close(edited["joint"][0], edited["keep"][0], rtol=1e-10, atol=1e-12)
    assert abs(edited["joint"][1] - edited["keep"][1]) < 1e-12 and 0.9 <= edited["keep"][1] < 1.0
    weight = module.weight.detach().clone()
    with pytest.raises(UserError, match="one set was collected with --bias keep"):
        apply_edit(model, factors, EditSpec({(1, "up"): 0.5}), protect=Protection(keep))
    assert torch.equal(module.weight, weight) and torch.equal(module.bias, bias)
