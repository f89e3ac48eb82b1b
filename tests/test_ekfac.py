"""EK-FAC eigenvalues (factors/ekfac.py) and mass selection (curvature.select_mass) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_collect import exact_model, token_gradients

from kfac_edit.curvature import eigendecompose, pairs_mask, projected_mass, select_mass, select_pairs
from kfac_edit.eigen import EigenCache
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.ekfac import Ekfac, collect_ekfac
from kfac_edit.factors.store import Factors
from kfac_edit.models import find_projections


def rel(a, b):
    return float((a - b).norm() / b.norm())


def gold_batch(seed=1, shape=(3, 7)):
    torch.manual_seed(seed)
    ids = torch.randint(0, 60, shape)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def brute_force_ekfac(model, batch, factors):
    """Σ over valid tokens of (U_Gᵀ g aᵀ U_A)², one token-loss backward at a time, explicit outer products."""
    projections = [p for p in find_projections(model) if p.name in factors]
    ins, summed, positions = token_gradients(model, batch, projections)
    result = {}
    for n in summed:
        ug = eigendecompose(factors.grad_cov(n)).vectors
        ua = eigendecompose(factors.activation_cov(n)).vectors
        total = 0
        for b, t in positions:
            per_token = torch.outer(summed[n][b, t], ins[n][b, t].detach())  # g aᵀ, (out, in)
            total = total + (ug.T @ per_token @ ua) ** 2
        result[n] = (total, len(positions))
    return result


def test_ekfac_matches_brute_force_fp64():
    model = exact_model()
    batch = gold_batch()
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, [batch], progress=False)
    expected = brute_force_ekfac(model, batch, factors)
    assert len(expected) == 6
    for name, (pair_sum, n) in expected.items():
        m = ekfac.modules[name]
        assert m.tokens == n == 13
        assert m.pair_sum.dtype == torch.float64
        assert rel(m.pair_sum, pair_sum) < 1e-10, name
        # the activation energy along u_A is the diagonal of U_Aᵀ A U_A: μ itself
        mu = eigendecompose(factors.activation_cov(name)).values
        assert rel(ekfac.activation_energy(name), mu) < 1e-10, name
        assert m.basis == factors.content_hash(name)


def test_ekfac_one_token_reduces_to_kfac():
    model = exact_model()
    batch = {"input_ids": torch.tensor([[3, 7]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}  # 1 label
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, [batch], progress=False)
    for name in factors.names:
        g, a = eigendecompose(factors.grad_cov(name)), eigendecompose(factors.activation_cov(name))
        kfac = torch.outer(g.values, a.values)
        assert float((ekfac.pair_mass(name) - kfac).abs().max()) < 1e-10 * float(kfac.max()), name
        assert float(kfac.max()) > 0


def test_ekfac_rank_one_activations_reduce_to_kfac():
    """Every token the same layer input (rank-one A): E[g'_i² a'_j²] = E[g'_i²]·a'_j² = λ_i·μ_j."""
    model = exact_model(layers=1)
    proj = find_projections(model, projections=["down"])[0]
    fixed = torch.randn(proj.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def constant_input(module, args):
        return (args[0] * 0 + fixed,)  # still on the graph, so gradients reach the output

    handle = proj.module.register_forward_pre_hook(constant_input)
    try:
        batch = gold_batch(seed=2, shape=(3, 9))
        factors = collect_factors(model, [batch], labels="gold", projections=[proj], progress=False)
        ekfac = collect_ekfac(model, factors, [batch], progress=False)
    finally:
        handle.remove()
    g, a = eigendecompose(factors.grad_cov(proj.name)), eigendecompose(factors.activation_cov(proj.name))
    kfac = torch.outer(g.values, a.values)
    assert float((ekfac.pair_mass(proj.name) - kfac).abs().max()) < 1e-10 * float(kfac.max())
    # and on a general batch it does not: the correction is not the identity
    batch = gold_batch()
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    ekfac = collect_ekfac(model, factors, [batch], progress=False)
    g, a = eigendecompose(factors.grad_cov(proj.name)), eigendecompose(factors.activation_cov(proj.name))
    assert rel(ekfac.pair_mass(proj.name), torch.outer(g.values, a.values)) > 0.05


def test_ekfac_passes_add_up_and_batch_size_invariant():
    model = exact_model()
    batch = gold_batch(shape=(4, 8))
    factors = collect_factors(model, [batch], labels="sampled", seed=5, progress=False)
    whole = collect_ekfac(model, factors, [batch], progress=False)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    for h, start in zip(halves, (0, 2)):
        h["window_index"] = torch.arange(start, start + 2)
    first = collect_ekfac(model, factors, halves[:1], progress=False)
    second = collect_ekfac(model, factors, halves[1:], progress=False)
    summed = first.add_(second)
    for name in factors.names:
        assert summed.modules[name].tokens == whole.modules[name].tokens
        assert rel(summed.modules[name].pair_sum, whole.modules[name].pair_sum) < 1e-10


def test_ekfac_save_load_and_basis_check(tmp_path):
    model = exact_model()
    batch = gold_batch()
    factors = collect_factors(model, [batch], labels="gold", progress=False, out=tmp_path / "f")
    on_disk = Factors.load(tmp_path / "f")
    ekfac = collect_ekfac(model, on_disk, [batch], cache=EigenCache(None), progress=False)
    ekfac.save(tmp_path / "f")
    loaded = Ekfac.load(tmp_path / "f")
    assert loaded.names == factors.names
    loaded.check_basis(Factors.load(tmp_path / "f"), loaded.names)
    for name in loaded.names:
        assert torch.equal(loaded.modules[name].pair_sum, ekfac.modules[name].pair_sum)
    # factors collected on other data: a one-line refusal
    other = collect_factors(model, [gold_batch(seed=9)], labels="gold", progress=False, out=tmp_path / "g")
    with pytest.raises(UserError, match="eigenbasis of other factors"):
        loaded.check_basis(Factors.load(tmp_path / "g"), loaded.names)
    assert other is not None


# ------------------------------------------------------------------------------------------------ select_mass
def brute_force_select(mass: np.ndarray, keep_mass: float) -> np.ndarray:
    """One pair at a time in descending mass (ties by row-major index) until the sum reaches the target."""
    flat = np.maximum(mass.ravel(), 0.0)
    keep = np.zeros(flat.size, dtype=bool)
    if keep_mass >= 1:
        return np.ones(mass.shape, dtype=bool)
    target = keep_mass * float(flat.sum())
    if not target > 0:
        return keep.reshape(mass.shape)
    order = sorted(range(flat.size), key=lambda k: (-flat[k], k))
    total = 0.0
    for k in order:
        keep[k] = True
        total += flat[k]
        if total >= target:
            break
    return keep.reshape(mass.shape)


values = st.one_of(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.0, 2.0]), st.floats(min_value=0.0, max_value=10.0))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 7).flatmap(lambda r: st.integers(1, 7).flatmap(
        lambda c: st.lists(values, min_size=r * c, max_size=r * c).map(lambda v: np.array(v).reshape(r, c))
    )),
    st.one_of(st.just(0.0), st.just(1.0), st.floats(min_value=0.0, max_value=1.0)),
)  # fmt: skip
def test_select_mass_matches_brute_force(mass, keep_mass):
    got = select_mass(torch.from_numpy(mass), keep_mass).numpy()
    assert np.array_equal(got, brute_force_select(mass, keep_mass))


def test_select_mass_of_products_equals_select_pairs():
    gen = torch.Generator().manual_seed(0)
    lam = torch.rand(13, generator=gen, dtype=torch.float64).sort(descending=True).values
    mu = torch.rand(11, generator=gen, dtype=torch.float64).sort(descending=True).values
    for keep_mass in (0.1, 0.5, 0.9, 0.99):
        by_mass = select_mass(torch.outer(lam, mu), keep_mass)
        by_pairs = pairs_mask(select_pairs(lam, mu, keep_mass), mu)
        assert torch.equal(by_mass, by_pairs), keep_mass


def test_projected_mass_brute_force():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    g_eig, a_eig = eigendecompose(x @ x.T), eigendecompose(y @ y.T)
    gp = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    ap = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    gp, ap = gp @ gp.T, ap @ ap.T
    got = projected_mass(gp, ap, g_eig, a_eig)
    for i in range(5):
        for j in range(4):
            fisher = torch.kron(gp, ap)  # vec(W) row-major: index i*in + j
            v = torch.kron(g_eig.vectors[:, i], a_eig.vectors[:, j])
            assert abs(float(v @ fisher @ v) - float(got[i, j])) < 1e-10 * float(got.max())
    # in its own basis it is λ_i·μ_j
    own = projected_mass(x @ x.T, y @ y.T, g_eig, a_eig)
    assert rel(own, torch.outer(g_eig.values, a_eig.values)) < 1e-12
