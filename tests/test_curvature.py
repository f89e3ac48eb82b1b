"""Curvature math against brute force: pair selection vs a full sort, the edit vs the eigenvectors of G ⊗ A."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kfac_edit import curvature
from kfac_edit.curvature import (
    Eigen,
    HalfProducts,
    edit_weight,
    eigendecompose,
    independent_counts,
    pair_mass_fraction,
    pair_stats,
    pairs_mask,
    project_weight,
    random_basis_edit,
    select_pairs,
    select_pairs_mask,
    staircase_cost,
    svd_truncate,
    truncation_rank,
)
from kfac_edit.errors import UserError


def random_spd(n: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64) / torch.arange(1, 3 * n + 1) ** (decay / 2)
    return x @ x.T / (3 * n)


def brute_force_count(lam: torch.Tensor, mu: torch.Tensor, keep_mass: float) -> tuple[int, torch.Tensor, float]:
    """Greedy one pair at a time: sort every product, take the shortest prefix reaching the target."""
    products = torch.sort((lam[:, None] * mu[None, :]).flatten(), descending=True).values
    cums = torch.cumsum(products, 0)
    target = keep_mass * float(lam.sum()) * float(mu.sum())
    if keep_mass >= 1:
        return products.numel(), cums, target
    if target <= 0:
        return 0, cums, target
    k = int((cums < target).sum()) + 1
    return min(k, products.numel()), cums, target


# Spectra with ties (values from a small set, repeated), zeros, and arbitrary floats.
tie_values = st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0])
spectrum = st.one_of(
    st.lists(tie_values, min_size=1, max_size=12),
    st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=12),
    st.lists(st.one_of(tie_values, st.floats(min_value=1e-6, max_value=5.0)), min_size=1, max_size=12),
)
keep = st.one_of(st.just(0.0), st.just(1.0), st.floats(min_value=0.0, max_value=1.0))


def select_pairs_all_paths(lam: torch.Tensor, mu: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """select_pairs with the final sort (default), with pure bisection + tie split (0), and a mix (3): all agree."""
    masks = []
    default = curvature._FINISH_BY_SORT
    try:
        for limit in (default, 0, 3):
            curvature._FINISH_BY_SORT = limit
            counts = select_pairs(lam, mu, keep_mass)
            assert counts.dtype == torch.int64 and tuple(counts.shape) == (lam.numel(),)
            mask = pairs_mask(counts, mu)
            assert torch.equal(mask, select_pairs_mask(lam, mu, keep_mass))
            assert torch.equal(mask.sum(1), counts)  # the staircase: row i keeps counts[i] pairs
            # ... its top counts[i] columns by μ (ties by column index)
            mu_order = sorted(range(mu.numel()), key=lambda j: (-float(mu[j].clamp_min(0)), j))
            for i in range(lam.numel()):
                assert sorted(mu_order[: int(counts[i])]) == torch.nonzero(mask[i]).flatten().tolist()
            stats = pair_stats(lam, mu, counts)
            assert stats.mass_fraction == pytest.approx(pair_mass_fraction(lam, mu, mask), rel=1e-12, abs=1e-300)
            assert (stats.pairs_kept, stats.grad_vectors_used, stats.act_vectors_used) == (
                int(mask.sum()), int(mask.any(1).sum()), int(mask.any(0).sum()))
            masks.append(mask)
    finally:
        curvature._FINISH_BY_SORT = default
    products = lam[:, None] * mu[None, :]
    for other in masks[1:]:  # the same count and the same mass (which tied pairs enter may differ)
        assert int(other.sum()) == int(masks[0].sum())
        assert float(products[other].sum()) == pytest.approx(float(products[masks[0]].sum()), rel=1e-12, abs=0)
    return masks[0]


@settings(max_examples=200, deadline=None)
@given(grad=spectrum, act=spectrum, keep_mass=keep)
@example(  # found by CI: keep_mass an ulp below 1 and a subnormal product; the paths disagreed by that pair
    grad=[1.6791731426075982, 1.5089454255535726, 1.5225106775193245, 0.0, 2.0, 2.0, 7.041304322198573,
          9.522510677519325, 10.0, 2.225073858507203e-309], act=[0.25], keep_mass=0.9999999999999999)
def test_select_pairs_matches_brute_force(grad, act, keep_mass):
    lam = torch.tensor(grad, dtype=torch.float64)
    mu = torch.tensor(act, dtype=torch.float64)
    mask = select_pairs_all_paths(lam, mu, keep_mass)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (len(grad), len(act))
    k_ref, cums, target = brute_force_count(lam, mu, keep_mass)
    k = int(mask.sum())
    products = lam[:, None] * mu[None, :]
    if keep_mass >= 1:
        assert bool(mask.all())
        return
    if target <= 0:
        assert k == 0
        return
    # The kept pairs are a top set: none outside has a larger product than one inside.
    if 0 < k < mask.numel():
        assert float(products[mask].min()) >= float(products[~mask].max())
    # Minimal and reaching the target (up to summation-order rounding), hence the greedy count.
    tol = 1e-12 * max(target, 1e-300)
    assert float(cums[k - 1]) >= target - tol
    assert k == 1 or float(cums[k - 2]) < target + tol
    if abs(float(cums[k_ref - 1]) - target) > tol and (k_ref == 1 or abs(float(cums[k_ref - 2]) - target) > tol):
        assert k == k_ref
        assert float(products[mask].sum()) == pytest.approx(float(cums[k_ref - 1]), rel=1e-12)


def test_select_pairs_edges():
    lam = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    mu = torch.tensor([2.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert int(select_pairs_mask(lam, mu, 0.0).sum()) == 0
    assert int(select_pairs_mask(lam, mu, 1.0).sum()) == 12
    assert int(select_pairs_mask(lam, mu, 1.5).sum()) == 12
    assert int(select_pairs(torch.zeros(3, dtype=torch.float64), mu, 0.5).sum()) == 0
    # total mass 4 * 5 = 20; products 6, 6, 3, 2, 2, 1, ...: 0.5 needs 10 -> 6 + 6 = 12 >= 10 after two pairs
    mask = select_pairs_mask(lam, mu, 0.5)
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [False] * 4]
    # ties at the boundary: only as many of the tied products as needed (6 + 6 + 3 = 15 >= 0.7 * 20 = 14)
    assert int(select_pairs_all_paths(lam, mu, 0.7).sum()) == 3
    flat = torch.ones(30, dtype=torch.float64)  # one tie group of 900 pairs: 0.5 needs exactly 450 of them
    assert int(select_pairs_all_paths(flat, flat, 0.5).sum()) == 450
    # unsorted input and tiny negative eigenvalues (clamped to zero)
    mask = select_pairs_mask(torch.tensor([1.0, -1e-18, 3.0]), torch.tensor([1.0, 2.0]), 0.5)
    assert mask.tolist() == [[False, False], [False, False], [False, True]]


def test_select_pairs_large_power_law_is_exact():
    lam = 1.0 / torch.arange(1, 601, dtype=torch.float64)
    mu = 1.0 / torch.arange(1, 301, dtype=torch.float64)
    for keep_mass in (0.3, 0.8, 0.95):
        mask = select_pairs_all_paths(lam, mu, keep_mass)
        k_ref, cums, target = brute_force_count(lam, mu, keep_mass)
        assert int(mask.sum()) == k_ref
        assert pair_mass_fraction(lam, mu, mask) == pytest.approx(float(cums[k_ref - 1]) / (target / keep_mass))


def test_eigendecompose_conventions():
    cov = random_spd(12, seed=1)
    cov[0, 1] += 1e-9  # slightly asymmetric: symmetrized
    eig = eigendecompose(cov.float(), "model.layers.0.mlp.up_proj")
    assert eig.values.dtype == torch.float64 and eig.vectors.dtype == torch.float64
    assert bool((eig.values[:-1] >= eig.values[1:]).all())
    sym = (cov + cov.T) / 2
    recon = eig.vectors @ torch.diag(eig.values) @ eig.vectors.T
    assert torch.allclose(recon, sym.float().double(), atol=1e-6)
    low_rank = torch.ones(5, 5, dtype=torch.float64)  # eigenvalues 5, 0, 0, 0, 0 (tiny negatives from rounding)
    assert float(eigendecompose(low_rank).values.min()) >= 0.0
    bad = cov.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(UserError, match="model.layers.3.mlp.down_proj"):
        eigendecompose(bad, "model.layers.3.mlp.down_proj")


def test_edit_equals_projection_on_top_fisher_eigenvectors():
    """Brute force: eigendecompose G ⊗ A itself, keep its top eigenvectors, project vec(W) (row-major)."""
    out_dim, in_dim = 7, 5
    grad_cov, act_cov = random_spd(out_dim, seed=2), random_spd(in_dim, seed=3)
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fisher = torch.kron(grad_cov, act_cov)  # acts on vec(W) with W[i, j] at index i * in + j
    values, vectors = torch.linalg.eigh(fisher)
    values, vectors = values.flip(0), vectors.flip(1)
    for keep_mass in (0.2, 0.5, 0.9, 0.99):
        k = int((torch.cumsum(values, 0) < keep_mass * float(values.sum())).sum()) + 1
        top = vectors[:, :k]
        expected = (top @ (top.T @ weight.flatten())).view(out_dim, in_dim)
        edited = edit_weight(weight, act_cov, grad_cov, keep_mass)
        assert torch.allclose(edited, expected, atol=1e-10)


def test_edit_keep_all_projection_idempotent_and_mass():
    out_dim, in_dim = 24, 16
    grad_eig = eigendecompose(random_spd(out_dim, seed=5))
    act_eig = eigendecompose(random_spd(in_dim, seed=6))
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = torch.ones(out_dim, in_dim, dtype=torch.bool)
    assert torch.allclose(project_weight(weight, grad_eig, act_eig, full), weight, rtol=0, atol=1e-12)
    w32 = weight.float()
    rel = (project_weight(w32, grad_eig, act_eig, full) - w32).norm() / w32.norm()
    assert float(rel) < 1e-6
    assert torch.equal(edit_weight(w32, torch.eye(in_dim), torch.eye(out_dim), 1.0), w32)
    for keep_mass in (0.3, 0.7):
        mask = select_pairs_mask(grad_eig.values, act_eig.values, keep_mass)
        once = project_weight(weight, grad_eig, act_eig, mask)
        counts = select_pairs(grad_eig.values, act_eig.values, keep_mass)
        assert torch.allclose(project_weight(weight, grad_eig, act_eig, counts), once, atol=1e-12)
        from_counts = pair_stats(grad_eig.values, act_eig.values, counts)
        from_mask = pair_stats(grad_eig.values, act_eig.values, mask)
        assert from_counts.mass_fraction == pytest.approx(from_mask.mass_fraction, rel=1e-12)
        assert (from_counts.pairs_kept, from_counts.grad_vectors_used, from_counts.act_vectors_used) == (
            from_mask.pairs_kept, from_mask.grad_vectors_used, from_mask.act_vectors_used)
        twice = project_weight(once, grad_eig, act_eig, mask)
        assert torch.allclose(once, twice, atol=1e-12)
        assert float(once.norm()) < float(weight.norm())
        stats = pair_stats(grad_eig.values, act_eig.values, mask)
        products = grad_eig.values[:, None] * act_eig.values[None, :]
        assert stats.mass_fraction == pytest.approx(float(products[mask].sum() / products.sum()), rel=1e-12)
        assert stats.mass_fraction >= keep_mass
        assert stats.pairs_kept == int(mask.sum())
        assert stats.grad_vectors_used == int(mask.any(1).sum())
        assert stats.act_vectors_used == int(mask.any(0).sum())
        assert stats.pairs_fraction == pytest.approx(stats.pairs_kept / (out_dim * in_dim))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_project_weight_any_mask_matches_dense(seed):
    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim = 40, 30
    grad_eig = eigendecompose(random_spd(out_dim, seed=10 + seed))
    act_eig = eigendecompose(random_spd(in_dim, seed=20 + seed))
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=gen)
    masks = [
        torch.rand(out_dim, in_dim, generator=gen) < 0.2,  # arbitrary pattern: rows out of order
        select_pairs_mask(grad_eig.values, act_eig.values, 0.6),
        pairs_mask(independent_counts(grad_eig.values, act_eig.values, 0.8), act_eig.values),
        torch.arange(in_dim)[None, :] < torch.randint(0, in_dim + 1, (out_dim, 1), generator=gen),  # unsorted prefixes
        torch.zeros(out_dim, in_dim, dtype=torch.bool),
    ]
    ug, ua = grad_eig.vectors, act_eig.vectors
    for mask in masks:
        dense = ug @ ((ug.T @ weight @ ua) * mask) @ ua.T
        assert torch.allclose(project_weight(weight, grad_eig, act_eig, mask), dense, atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1])
def test_project_weight_counts_match_dense(seed):
    """The staircase path: any counts (sorted or not), tied μ (columns placed by rank), fp32 to rounding."""
    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim = 50, 36
    grad_eig = eigendecompose(random_spd(out_dim, seed=70 + seed))
    act_eig = eigendecompose(random_spd(in_dim, seed=80 + seed))
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=gen)
    ug, ua = grad_eig.vectors, act_eig.vectors
    staircases = [
        select_pairs(grad_eig.values, act_eig.values, 0.5),
        select_pairs(grad_eig.values, act_eig.values, 0.95),
        independent_counts(grad_eig.values, act_eig.values, 0.7),
        torch.randint(0, in_dim + 1, (out_dim,), generator=gen),  # rows out of order
        torch.full((out_dim,), in_dim),
        torch.zeros(out_dim, dtype=torch.int64),
    ]
    for counts in staircases:
        mask = pairs_mask(counts, act_eig.values)
        dense = ug @ ((ug.T @ weight @ ua) * mask) @ ua.T
        assert torch.allclose(project_weight(weight, grad_eig, act_eig, counts), dense, atol=1e-11)
        w32 = project_weight(weight.float(), grad_eig, act_eig, counts)
        assert w32.dtype == torch.float32
        assert float((w32.double() - dense).abs().max()) < 2e-5 * float(weight.abs().max())
        assert 0 <= staircase_cost(counts, out_dim, in_dim) <= 2 * out_dim * in_dim * (out_dim + in_dim) * 1.2
    # eigenvalues not descending (ties, or any order): counts pick the top columns by μ, lower index first
    values = torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0, 2.0], dtype=torch.float64)
    tied = Eigen(values, random_orthogonal_basis(6, seed))
    grad_small = Eigen(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), random_orthogonal_basis(3, seed + 5))
    w = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    counts = torch.tensor([4, 2, 1])
    mask = pairs_mask(counts, values)
    assert mask.tolist()[0] == [False, True, True, False, True, True]
    assert mask.tolist()[2] == [False, True, False, False, False, False]
    dense = grad_small.vectors @ ((grad_small.vectors.T @ w @ tied.vectors) * mask) @ tied.vectors.T
    assert torch.allclose(project_weight(w, grad_small, tied, counts), dense, atol=1e-12)
    assert torch.equal(select_pairs_mask(grad_small.values, values, 0.6), pairs_mask(
        select_pairs(grad_small.values, values, 0.6), values))
    with pytest.raises(ValueError, match="counts"):
        project_weight(w, grad_small, tied, torch.tensor([7, 0, 0]))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    keeps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    full=st.sampled_from(["none", "rows", "columns", "both"]),
    seed=st.integers(0, 2**16),
)
@example(shape=(30, 12), keeps=[0.95, 0.3, 0.99, 0.5], full="both", seed=0)
def test_project_weight_half_products_match_dense(shape, keeps, full, seed):
    """A sweep through one HalfProducts (keep_mass up and down) equals fresh calls and the dense projection (fp64),
    also where rows keep every column and columns are kept by every row (the plan's shortcuts)."""
    out_dim, in_dim = shape
    gen = torch.Generator().manual_seed(seed)
    grad_eig = eigendecompose(random_spd(out_dim, seed=seed))
    act_eig = eigendecompose(random_spd(in_dim, seed=seed + 1))
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=gen)
    ug, ua = grad_eig.vectors, act_eig.vectors
    halves = HalfProducts()
    for keep in keeps:
        counts = select_pairs(grad_eig.values, act_eig.values, keep)
        if full in ("rows", "both"):
            counts[: (out_dim + 1) // 2] = in_dim
        if full in ("columns", "both"):
            counts.clamp_(min=min(2, in_dim))
        dense = ug @ ((ug.T @ weight @ ua) * pairs_mask(counts, act_eig.values)) @ ua.T
        fresh = project_weight(weight, grad_eig, act_eig, counts)
        cached = project_weight(weight, grad_eig, act_eig, counts, halves=halves)
        assert float((fresh - dense).abs().max()) < 1e-12
        assert float((cached - dense).abs().max()) < 1e-12
        assert float((cached - fresh).abs().max()) < 1e-12
    assert halves.nbytes <= 8 * 2 * out_dim * in_dim  # at most U_Gᵀ W and W U_A in full
    assert staircase_cost(counts, out_dim, in_dim, halves) <= staircase_cost(counts, out_dim, in_dim)


def test_half_products_grow_and_are_reused():
    grad_eig, act_eig = eigendecompose(random_spd(40, seed=3)), eigendecompose(random_spd(20, seed=4))
    weight = torch.randn(40, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    halves = HalfProducts()
    low, high = (select_pairs(grad_eig.values, act_eig.values, k) for k in (0.6, 0.97))
    project_weight(weight, grad_eig, act_eig, low, halves=halves)
    lead, trail = halves.rows("lead"), halves.rows("trail")
    assert 0 < lead + trail and halves.nbytes == 8 * (lead * 20 + trail * 40)
    assert torch.allclose(halves.lead, grad_eig.vectors[:, :lead].T @ weight, atol=1e-13)
    assert torch.allclose(halves.trail, (weight @ act_eig.vectors[:, :trail]).T, atol=1e-13)
    project_weight(weight, grad_eig, act_eig, high, halves=halves)
    assert halves.rows("lead") >= lead and halves.rows("trail") >= trail
    held = (halves.lead, halves.trail)
    project_weight(weight, grad_eig, act_eig, low, halves=halves)  # nothing new needed: the same tensors
    assert halves.lead is held[0] and halves.trail is held[1]
    # fp32 weights (another compute dtype) do not use fp64 half-products, nor overwrite them
    w32 = project_weight(weight.float(), grad_eig, act_eig, low, halves=halves)
    assert w32.dtype == torch.float32 and halves.lead is held[0]
    assert float((w32.double() - project_weight(weight, grad_eig, act_eig, low)).abs().max()) < 1e-5
    # the plan's shortcuts in use: 5 rows keep every column, every row keeps columns 0..2
    counts = torch.tensor([20] * 5 + [6] * 15 + [3] * 20)
    assert curvature._staircase_plan(counts.numpy(), 40, 20)[:2] == (5, 3)
    dense = grad_eig.vectors @ ((grad_eig.vectors.T @ weight @ act_eig.vectors) * pairs_mask(counts, 20))
    dense = dense @ act_eig.vectors.T
    assert float((project_weight(weight, grad_eig, act_eig, counts, halves=halves) - dense).abs().max()) < 1e-12


def random_orthogonal_basis(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))[0]


def test_eigen_keeps_compute_dtype_copies():
    eig = eigendecompose(random_spd(8, seed=90))
    first = eig.vectors_as(torch.float32)
    assert first.dtype == torch.float32 and torch.allclose(first.double(), eig.vectors, atol=1e-7)
    assert eig.vectors_as(torch.float32) is first  # cast once, reused across a sweep
    assert eig.to("cpu") is eig and eig.to("cpu").vectors_as(torch.float32) is first
    assert eig.vectors_as(torch.float64) is eig.vectors
    assert eig.nbytes == 8 * 8 + 8 * 64 + 4 * 64  # values, fp64 vectors, the fp32 copy


def test_independent_truncation():
    out_dim, in_dim = 12, 9
    grad_eig = eigendecompose(random_spd(out_dim, seed=30))
    act_eig = eigendecompose(random_spd(in_dim, seed=31))
    weight = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
    r_grad = truncation_rank(grad_eig.values, 0.7)
    r_act = truncation_rank(act_eig.values, 0.7)
    assert float(grad_eig.values[:r_grad].sum()) >= 0.7 * float(grad_eig.values.sum())
    assert float(grad_eig.values[: r_grad - 1].sum()) < 0.7 * float(grad_eig.values.sum())
    ug, ua = grad_eig.vectors[:, :r_grad], act_eig.vectors[:, :r_act]
    expected = ug @ ug.T @ weight @ ua @ ua.T
    independent = pairs_mask(independent_counts(grad_eig.values, act_eig.values, 0.7), act_eig.values)
    edited = project_weight(weight, grad_eig, act_eig, independent)
    assert torch.allclose(edited, expected, atol=1e-12)


def test_truncation_rank():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [truncation_rank(values, f) for f in (0.0, 0.4, 0.41, 0.7, 0.9, 1.0)] == [0, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("shape", [(10, 6), (5, 9)])
def test_svd_truncation_matches_svd(shape):
    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(40))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    energy = s**2 / (s**2).sum()
    edited, rank, kept = svd_truncate(weight, 0.8)
    assert rank == int((torch.cumsum(energy, 0) < 0.8).sum()) + 1
    assert kept == pytest.approx(float(energy[:rank].sum()))
    expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert torch.allclose(edited, expected, atol=1e-10)
    assert torch.equal(svd_truncate(weight, 1.0)[0], weight)


def test_random_basis_edit_control():
    weight = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(50))
    edited = random_basis_edit(weight, 20, seed=3)
    assert torch.equal(edited, random_basis_edit(weight, 20, seed=3))
    assert not torch.allclose(edited, random_basis_edit(weight, 20, seed=4))
    assert torch.allclose(random_basis_edit(edited, 20, seed=3), edited, atol=1e-12)  # a projection
    assert float(edited.norm()) < float(weight.norm())
    assert torch.allclose(random_basis_edit(weight, 48, seed=3), weight, atol=1e-12)
    assert float(random_basis_edit(weight, 0, seed=3).abs().max()) == 0.0


def test_dtype_and_device_preserved():
    weight = torch.randn(6, 4).to(torch.bfloat16)
    edited = edit_weight(weight, random_spd(4, seed=60), random_spd(6, seed=61), 0.5)
    assert edited.dtype == torch.bfloat16 and edited.device == weight.device and edited.shape == weight.shape
    with pytest.raises(ValueError, match="needs A"):
        edit_weight(weight, random_spd(5, seed=60), random_spd(6, seed=61), 0.5)
    eig = Eigen(torch.ones(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        project_weight(torch.randn(3, 4), eig, eig, torch.ones(3, 4, dtype=torch.bool))
