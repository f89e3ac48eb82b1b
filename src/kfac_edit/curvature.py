"""Pure math of the curvature edit: eigendecomposition, pair-mass selection, projection. No hooks, no I/O.

Conventions (referenced from every other module):

* A projection's weight ``W`` has shape ``(out, in)`` (the ``nn.Linear`` layout).
* ``A = E[a aᵀ]`` is the activation covariance over the layer's inputs, ``(in, in)``;
  ``G = E[g gᵀ]`` is the covariance of the loss gradients w.r.t. the layer's outputs, ``(out, out)``.
* The K-FAC Fisher block of ``vec(W)`` is ``G ⊗ A``.
* ``G = U_G diag(λ) U_Gᵀ`` and ``A = U_A diag(μ) U_Aᵀ``, eigenvalues in descending order. In the eigenbasis the
  weight has coefficients ``C = U_Gᵀ W U_A`` (``out × in``); coefficient ``C[i, j]`` sits on the Fisher eigenvector
  ``u_G[i] ⊗ u_A[j]`` whose eigenvalue, the **mass of pair (i, j)**, is ``λ_G[i]·μ_A[j]``. The total mass is
  ``(Σλ)(Σμ) = tr(G)·tr(A)``.
* The edit keeps the smallest set ``M`` of pairs, taken in descending order of mass, whose summed mass reaches
  ``keep_mass·(Σλ)(Σμ)`` and writes ``W' = U_G (C ⊙ M) U_Aᵀ``: an orthogonal projection of ``W``.
* Masks are boolean ``(out, in)`` tensors indexed like ``C`` (row ``i`` ↔ ``u_G[i]``, column ``j`` ↔ ``u_A[j]``).
  A selection is kept as its **staircase** of per-row counts (``(out,)`` int64, :func:`select_pairs`); a mask is
  built from it only when asked (:func:`pairs_mask`).

Numerics: eigendecompositions are fp64 (symmetrized first, tiny negative eigenvalues clamped to 0). Projections run
in fp64 for fp64 weights and fp32 otherwise (the result is cast back to the weight's dtype and device).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

_ROW_CHUNK = 2048  # rows of an (out, in) mask processed at once when reducing it (bounds temporary memory)
_FINISH_BY_SORT = 1 << 14  # bisect until at most this many pairs lie between the brackets, then sort them


@dataclass
class Eigen:
    """``cov = vectors @ diag(values) @ vectors.T``: ``values`` fp64, descending, ``>= 0``; ``vectors`` fp64, one
    eigenvector per column."""

    values: torch.Tensor
    vectors: torch.Tensor
    _cast: dict = field(default_factory=dict, repr=False, compare=False)  # dtype -> vectors in that dtype

    @property
    def size(self) -> int:
        return int(self.values.numel())

    def to(self, device: torch.device | str) -> "Eigen":
        """This eigenbasis on ``device`` (the same object, with its cached casts, when it is already there)."""
        if self.vectors.device == torch.device(device) and self.values.device == self.vectors.device:
            return self
        return Eigen(self.values.to(device), self.vectors.to(device))

    @property
    def nbytes(self) -> int:
        """Bytes held: values, vectors and the compute-dtype copies made by :meth:`vectors_as`."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.vectors, *self._cast.values()))

    def vectors_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``vectors`` in ``dtype``, cast once and kept (a sweep projects with the same basis many times)."""
        if dtype == self.vectors.dtype:
            return self.vectors
        cast = self._cast.get(dtype)
        if cast is None or cast.device != self.vectors.device:
            cast = self._cast[dtype] = self.vectors.to(dtype).contiguous()
        return cast


@dataclass
class PairStats:
    """What a mask keeps, in the curvature's terms (see the module docstring); ``None``: not defined for a method."""

    pairs_kept: int
    pairs_total: int
    mass_fraction: float | None  # kept mass / total mass
    grad_vectors_used: int | None  # distinct G eigenvectors (rows) with at least one kept pair
    act_vectors_used: int | None  # distinct A eigenvectors (columns) with at least one kept pair

    @property
    def pairs_fraction(self) -> float:
        return self.pairs_kept / self.pairs_total if self.pairs_total else 0.0


def eigendecompose(cov: torch.Tensor, name: str = "") -> Eigen:
    """Eigendecompose a symmetric PSD covariance in fp64, eigenvalues descending and clamped to ``>= 0``;
    :class:`UserError` naming ``name`` (the module) when it holds NaN or Inf or is far from PSD."""
    where = name or "covariance"
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{where}: a covariance must be square, got shape {tuple(cov.shape)}")
    c = cov.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise UserError(
            f"{where}: the covariance factor contains NaN or Inf; recollect the factors of this module "
            "(in float32, or with fewer tokens per batch if activations overflow)"
        )
    c = (c + c.T) * 0.5
    try:
        values, vectors = torch.linalg.eigh(c)
    except RuntimeError:  # rare non-convergence on some GPU backends: retry on the CPU
        if c.device.type == "cpu":
            raise
        values, vectors = torch.linalg.eigh(c.cpu())
        values, vectors = values.to(c.device), vectors.to(c.device)
    values, vectors = values.flip(0), vectors.flip(1)
    top, low = (float(values[0]), float(values[-1])) if values.numel() else (0.0, 0.0)
    negative = float(values.clamp_max(0.0).abs().sum())
    if not top > 0 or negative > 1e-3 * float(values.abs().sum()):  # zero, or far from PSD: an edit would zero W
        raise UserError(
            f"{where}: the factor is not positive semi-definite (largest eigenvalue {top:.3g}, negative eigenvalues "
            f"hold {negative:.3g}); recollect the factors of this module"
        )
    if low < -1e-6 * max(top, 0.0) - 1e-12:
        log.warning("%s: covariance has a negative eigenvalue %.3g (largest %.3g); clamped to 0", where, low, top)
    return Eigen(values.clamp_min(0.0).contiguous(), vectors.contiguous())


# Pair selection -----------------------------------------------------------------------------------------------------


def _f64_from_bits(bits: int) -> float:
    return float(np.int64(bits).view(np.float64))


def _bits_from_f64(x: float) -> int:
    return int(np.float64(x).view(np.int64))


class _PairIndex:
    """Counts and masses of ``{(i, j): λ_i·μ_j >= t}`` in O(out·log in), with products exactly as fp64 computes them.

    NumPy on the CPU (thousands of tiny operations on the eigenvalues). Row ``i`` keeps the top-``count_i`` values
    of ``μ`` (``λ`` in any order; equal ``μ`` ranked by column index, so for descending ``μ`` the first columns).
    """

    def __init__(self, lam: torch.Tensor, mu: torch.Tensor):
        self.lam = lam.cpu().numpy()
        self.mu_asc = np.sort(mu.cpu().numpy())
        self.n = self.mu_asc.size
        self.top_sums = np.concatenate([[0.0], np.cumsum(self.mu_asc[::-1])])  # top_sums[c] = Σ of the top c μ
        self.positive = self.lam > 0
        self.safe_lam = np.where(self.positive, self.lam, 1.0)

    def counts(self, t: float) -> np.ndarray:
        """Per row, the number of columns with ``fl(λ_i·μ_j) >= t`` (``t > 0``)."""
        lam, mu, n, positive = self.lam, self.mu_asc, self.n, self.positive
        with np.errstate(over="ignore"):
            k = np.searchsorted(mu, t / self.safe_lam)  # first index with μ >= t/λ_i, up to the rounding of t/λ_i
        # Make the boundary exact for the fp64 products, jumping over groups of equal μ.
        while True:
            prev = np.maximum(k - 1, 0)
            left = positive & (k > 0) & (lam * mu[prev] >= t)
            if not left.any():
                break
            k = np.where(left, np.searchsorted(mu, mu[prev]), k)
        while True:
            cur = np.minimum(k, n - 1)
            right = positive & (k < n) & (lam * mu[cur] < t)
            if not right.any():
                break
            k = np.where(right, np.searchsorted(mu, mu[cur], side="right"), k)
        return np.where(positive, n - k, 0)

    def finish_by_sort(self, counts_hi: np.ndarray, counts_lo: np.ndarray, target: float) -> np.ndarray:
        """Per row, how many of the pairs ranked ``[counts_hi, counts_lo)`` to add so the mass reaches ``target``.

        The candidates are sorted by product (descending) and added in that order from ``mass(counts_hi)``.
        """
        extra = counts_lo - counts_hi
        n = int(extra.sum())
        rows = np.repeat(np.arange(extra.size), extra)
        first = np.repeat(np.cumsum(extra) - extra, extra)
        ranks = np.arange(n) - first + np.repeat(counts_hi, extra)  # rank in descending μ
        products = self.lam[rows] * self.mu_asc[self.n - 1 - ranks]
        order = np.argsort(-products, kind="stable")
        cums = self.mass(counts_hi) + np.cumsum(products[order])
        # A target the running sum misses only by summation-order rounding (keep_mass within an ulp of 1): the
        # shortest prefix reaching the largest sum, so pairs too small to change it in fp64 stay out, as bisection
        # (which sums by row) leaves them.
        take = min(int(np.searchsorted(cums, min(target, float(cums[-1])))) + 1, n)
        return np.bincount(rows[order[:take]], minlength=extra.size)

    def mass(self, counts: np.ndarray) -> float:
        return float((self.lam * self.top_sums[counts]).sum())


def _descending_rank(mu: torch.Tensor) -> np.ndarray | None:
    """Rank of each column in descending order of ``mu`` (ties: lower index first); None when that is the identity."""
    m = mu.detach().cpu().numpy()
    if m.size < 2 or bool(np.all(m[:-1] >= m[1:])):
        return None
    order = np.argsort(-m, kind="stable")
    rank = np.empty(m.size, dtype=np.int64)
    rank[order] = np.arange(m.size)
    return rank


def _check_eigvals(values: torch.Tensor, what: str) -> torch.Tensor:
    if values.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
    values = values.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what} contain NaN or Inf")
    return values.clamp_min(0.0)


def select_pairs(grad_eigvals: torch.Tensor, act_eigvals: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """The smallest set of top-mass pairs whose mass reaches ``keep_mass·(Σλ)(Σμ)``, as a staircase.

    Returns an int64 CPU ``(out,)`` tensor: row ``i`` (``u_G[i]``) keeps its top-``counts[i]`` columns in
    descending order of ``μ`` (ties by column index), i.e. the prefix ``[0, counts[i])`` for descending ``μ``
    (:func:`eigendecompose`'s order). :func:`pairs_mask` builds the bool mask; :func:`select_pairs_mask` does both.
    The mass selected equals adding pairs one at a time in descending order of ``λ_G[i]·μ_A[j]`` (which pairs of
    equal mass enter at the boundary is arbitrary). ``keep_mass >= 1`` keeps all; ``<= 0`` (or a zero spectrum) none.

    Exact, never O(out·in): bisection over the fp64 bit patterns of the threshold product ``t``, each step one
    ``searchsorted`` per row (count of products ``>= t``) and prefix sums of sorted ``μ`` (their mass); once at most
    ``_FINISH_BY_SORT`` pairs lie between the brackets they are sorted and added in order.
    """
    lam = _check_eigvals(grad_eigvals, "grad_eigvals")
    mu = _check_eigvals(act_eigvals, "act_eigvals")
    out_dim, in_dim = lam.numel(), mu.numel()
    if keep_mass >= 1.0:
        return torch.full((out_dim,), in_dim, dtype=torch.int64)
    target = float(keep_mass) * float(lam.sum()) * float(mu.sum())
    if not target > 0.0 or out_dim == 0 or in_dim == 0:
        return torch.zeros(out_dim, dtype=torch.int64)
    return torch.from_numpy(_select_counts(_PairIndex(lam, mu), lam, mu, target).astype(np.int64))


def _select_counts(index: _PairIndex, lam: torch.Tensor, mu: torch.Tensor, target: float) -> np.ndarray:
    smallest = _bits_from_f64(5e-324)  # the smallest positive fp64: counts every positive product
    counts_lo = index.counts(_f64_from_bits(smallest))
    if index.mass(counts_lo) < target:  # only by rounding, with keep_mass within ~1e-15 of 1: keep all positive pairs
        return counts_lo
    top = float(lam.max()) * float(mu.max())
    lo, hi = smallest, _bits_from_f64(top) + 1  # invariant: mass(>= lo) >= target > mass(>= hi)
    counts_hi = np.zeros_like(counts_lo)
    while hi - lo > 1 and int((counts_lo - counts_hi).sum()) > _FINISH_BY_SORT:
        mid = (lo + hi) // 2
        counts_mid = index.counts(_f64_from_bits(mid))
        if index.mass(counts_mid) >= target:
            lo, counts_lo = mid, counts_mid
        else:
            hi, counts_hi = mid, counts_mid
    if hi - lo > 1:  # few pairs left between the brackets: sort them, as the one-at-a-time order would
        return counts_hi + index.finish_by_sort(counts_hi, counts_lo, target)
    threshold = _f64_from_bits(lo)  # a tie group larger than _FINISH_BY_SORT, all of product `threshold`
    ties = counts_lo - counts_hi  # per row, pairs whose product equals the threshold
    need = min(max(math.ceil((target - index.mass(counts_hi)) / threshold), 1), int(ties.sum()))
    # Take the first `need` tied pairs in row order (each row's ties are the next columns of its prefix).
    return counts_hi + np.clip(need - (np.cumsum(ties) - ties), 0, ties)


def _as_counts(counts) -> np.ndarray:
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    return c.astype(np.int64, copy=False)


def pairs_mask(counts, act_eigvals: torch.Tensor | int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bool ``(out, in)`` mask of a staircase from :func:`select_pairs` (or :func:`independent_counts`).

    ``act_eigvals``: the A eigenvalues the counts were selected with (their order places the kept columns), or
    just ``in`` when they are descending. Row ``i`` keeps its top-``counts[i]`` columns by ``μ``.
    """
    c = _as_counts(counts)
    rank = None if isinstance(act_eigvals, int) else _descending_rank(act_eigvals.detach().to(torch.float64))
    n_cols = act_eigvals if isinstance(act_eigvals, int) else int(act_eigvals.numel())
    index = np.int16 if n_cols < 2**15 else np.int32
    cols = np.arange(n_cols, dtype=index) if rank is None else rank.astype(index)
    # NumPy's broadcast compare is ~10x faster than torch's on a CPU
    return torch.from_numpy(np.less(cols[None, :], c.astype(index)[:, None])).to(device)


def select_pairs_mask(grad_eigvals: torch.Tensor, act_eigvals: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """:func:`select_pairs` as a bool ``(out, in)`` mask on the eigenvalues' device."""
    return pairs_mask(select_pairs(grad_eigvals, act_eigvals, keep_mass), act_eigvals, device=grad_eigvals.device)


def select_mass(mass: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """:func:`select_pairs` for any nonnegative ``(out, in)`` mass (e.g. EK-FAC second moments), as a bool mask.

    Pairs are ranked by mass (ties in row-major order) and kept up to the first whose running fp64 sum reaches
    ``keep_mass·Σ mass``. One sort, O(N log N) for ``N = out·in``. ``keep_mass >= 1`` keeps all; ``<= 0`` none.
    """
    if mass.dim() != 2:
        raise ValueError(f"mass must be 2-D (out, in), got shape {tuple(mass.shape)}")
    m = mass.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(m).all():
        raise ValueError("mass contains NaN or Inf")
    m = np.maximum(m, 0.0)
    if keep_mass >= 1.0:
        return torch.ones(mass.shape, dtype=torch.bool, device=mass.device)
    flat = m.ravel()
    target = float(keep_mass) * float(flat.sum())
    keep = np.zeros(flat.size, dtype=bool)
    if target > 0.0:
        order = np.argsort(-flat, kind="stable")
        cums = np.cumsum(flat[order])
        k = min(int(np.searchsorted(cums, target, side="left")) + 1, flat.size)
        keep[order[:k]] = True
    return torch.from_numpy(keep.reshape(m.shape)).to(mass.device)


def kept_mass_fraction(mass: torch.Tensor, mask: torch.Tensor) -> float:
    """``Σ mass[mask] / Σ mass`` in fp64 (0.0 for a zero mass); ``mask`` bool ``(out, in)`` or staircase counts."""
    m = mass.detach().to("cpu", torch.float64).clamp_min(0.0)
    if _is_counts(mask):
        raise ValueError("kept_mass_fraction needs a bool mask; build it with pairs_mask(counts, act_eigvals)")
    total = float(m.sum())
    return float(m[mask.to("cpu")].sum()) / total if total > 0 else 0.0


def diagonal_in_basis(cov: torch.Tensor, eig: Eigen) -> torch.Tensor:
    """``u[k]ᵀ cov u[k]`` for every eigenvector ``u[k]`` of ``eig`` (fp64, ``>= 0``): another covariance's energy
    along this basis, e.g. a protected capability's ``G_p`` along the edited module's ``u_G``."""
    c = cov.detach().to(eig.vectors.device, torch.float64)
    c = (c + c.T) * 0.5
    return ((c @ eig.vectors) * eig.vectors).sum(0).clamp_min(0.0)


def projected_mass(grad_cov: torch.Tensor, act_cov: torch.Tensor, grad_eig: Eigen, act_eig: Eigen) -> torch.Tensor:
    """The ``(out, in)`` mass of another curvature ``G_p ⊗ A_p`` on the pairs of this eigenbasis:
    ``(u_G[i]ᵀ G_p u_G[i])·(u_A[j]ᵀ A_p u_A[j])`` (fp64). For ``G_p, A_p`` the factors of the basis itself this is
    ``λ_i·μ_j``."""
    return torch.outer(diagonal_in_basis(grad_cov, grad_eig), diagonal_in_basis(act_cov, act_eig))


def truncation_rank(values: torch.Tensor, keep_mass: float) -> int:
    """The smallest ``r`` whose top-``r`` values (sorted descending) sum to ``keep_mass`` of the total."""
    v = np.sort(values.detach().to("cpu", torch.float64).clamp_min(0.0).numpy())[::-1]
    if keep_mass >= 1.0:
        return v.size
    target = float(keep_mass) * float(v.sum())
    if not target > 0.0:
        return 0
    return min(int(np.searchsorted(np.cumsum(v), target)) + 1, v.size)


def independent_counts(grad_eigvals: torch.Tensor, act_eigvals: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """Independent truncation as per-row counts: the top eigenvectors of G holding ``keep_mass`` of Σλ times those
    of A holding ``keep_mass`` of Σμ (a rectangle, the first ``r_G`` rows keep ``r_A`` columns; its pair mass is
    about ``keep_mass²``). Eigenvalues descending."""
    r_grad = truncation_rank(grad_eigvals, keep_mass)
    r_act = truncation_rank(act_eigvals, keep_mass)
    counts = torch.zeros(grad_eigvals.numel(), dtype=torch.int64)
    counts[:r_grad] = r_act
    return counts


def _row_sums(mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mask @ weights`` (fp64) or per-row counts, in row chunks so no float copy of the whole mask is made."""
    if weights is None and mask.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1).astype(np.int64))
    parts = []
    for start in range(0, mask.shape[0], _ROW_CHUNK):
        chunk = mask[start : start + _ROW_CHUNK]
        if weights is None:  # a uint8 view sums several times faster than bool
            parts.append(chunk.view(torch.uint8).sum(1, dtype=torch.int64))
        else:
            parts.append(chunk.to(weights.dtype) @ weights)
    return torch.cat(parts)


def _row_extents(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last kept column (0 for an empty row)."""
    n_cols = mask.shape[1]
    if mask.device.type == "cpu":  # NumPy's argmax over bools stops at the first True: fast
        m = mask.numpy()
        last = n_cols - np.argmax(m[:, ::-1], axis=1)
        return torch.from_numpy(np.where(m.any(axis=1), last, 0).astype(np.int64))
    index_dtype = torch.int16 if n_cols < 2**15 else torch.int32
    cols = torch.arange(1, n_cols + 1, dtype=index_dtype, device=mask.device)
    parts = [(mask[s : s + _ROW_CHUNK] * cols).amax(1) for s in range(0, mask.shape[0], _ROW_CHUNK)]
    return torch.cat(parts).to(torch.int64)


def _is_counts(selection: torch.Tensor) -> bool:
    return selection.dim() == 1


def pair_mass_fraction(grad_eigvals: torch.Tensor, act_eigvals: torch.Tensor, mask: torch.Tensor) -> float:
    """Mass of the pairs in ``mask`` (a bool mask, or per-row counts from :func:`select_pairs`) over the total
    mass ``(Σλ)(Σμ)``; 0.0 when the total is 0."""
    lam = _check_eigvals(grad_eigvals, "grad_eigvals")
    mu = _check_eigvals(act_eigvals, "act_eigvals").to(mask.device)
    total = float(lam.sum()) * float(mu.sum())
    if total <= 0.0:
        return 0.0
    if _is_counts(mask):  # prefix sums of the descending μ: O(out)
        return _PairIndex(lam, mu).mass(_as_counts(mask)) / total
    return float((_row_sums(mask, mu) * lam.to(mask.device)).sum()) / total


def pair_stats(grad_eigvals: torch.Tensor, act_eigvals: torch.Tensor, mask: torch.Tensor) -> PairStats:
    """:class:`PairStats` of a bool ``(out, in)`` mask or of per-row counts (O(out), no mask built)."""
    counts = _is_counts(mask)
    rows = _as_counts(mask) if counts else _row_sums(mask).cpu().numpy()
    return PairStats(
        pairs_kept=int(rows.sum()),
        pairs_total=rows.size * int(act_eigvals.numel()),
        mass_fraction=pair_mass_fraction(grad_eigvals, act_eigvals, mask),
        grad_vectors_used=int(np.count_nonzero(rows)),
        # a staircase's row sets are nested: the largest is their union
        act_vectors_used=int(rows.max(initial=0)) if counts else int((_row_sums(mask.T) > 0).sum()),
    )


# Projection ---------------------------------------------------------------------------------------------------------


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


_BLOCK_RATIO = 1.25  # a block of rows (columns) spans prefixes (extents) within this factor of its longest
_PAD = 1.15  # the block padding's average excess area, in the cost model


@dataclass(eq=False)
class HalfProducts:
    """``lead = U_G[:, :a]ᵀ W`` (``a × in``) and ``trail = (W U_A[:, :b])ᵀ`` (``b × out``) of one weight, grown to
    the longest prefixes :func:`project_weight` has needed: a sweep projects the same ``W`` at many ``keep_mass``.
    At most ``2·out·in`` elements of the compute dtype (360 MB in fp32 at 11008 × 4096);
    :meth:`kfac_edit.eigen.EigenCache.half_products` keys them by the weight's bytes and bounds their total."""

    lead: torch.Tensor | None = None
    trail: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lead, self.trail) if t is not None)

    def fits(self, like: torch.Tensor) -> bool:
        return all(t.dtype == like.dtype and t.device == like.device for t in (self.lead, self.trail) if t is not None)

    def rows(self, which: str) -> int:
        held = getattr(self, which)
        return 0 if held is None else held.shape[0]

    def prefix(self, which: str, n: int, make) -> torch.Tensor:
        """The first ``n`` rows of ``which``, the missing ones made by ``make(start, stop)``."""
        held, have = getattr(self, which), self.rows(which)
        if have < n:
            held = make(have, n) if held is None else torch.cat([held, make(have, n)])
            setattr(self, which, held)
        return held[:n]


def _staircase_plan(c: np.ndarray, out_dim: int, in_dim: int, have: tuple[int, int] = (0, 0)) -> tuple[int, int, float]:
    """``(a, g, multiply count)`` of the cheapest split of a staircase ``c`` (sorted descending, all > 0).

    Columns ``[0, g)``, kept by every row, are ``Y[:, :g] = W U_A[:, :g]`` as they are (``g`` is 0 or ``c[-1]``).
    Rows ``[0, a)`` are done column-wise through ``X = U_G[:, :a]ᵀ W`` (``a × in``): the rows keeping every column
    as ``X[i] − X[i] U_A[:, :g] U_A[:, :g]ᵀ``, the others in blocks of columns ``j >= g`` of similar extent,
    ``C = X[rows] U_A[:, cols]``, masked, summed into ``Q += C U_A[:, cols]ᵀ``: ``2·in`` per pair. Rows
    ``[a, n)``, whose prefixes are at most ``b = c[a]``, are done row-wise through ``Y = W U_A[:, :b]``: blocks of
    rows of similar prefix give ``C = U_G[:, rows]ᵀ Y[:, g:w]``, masked, summed into ``P += U_G[:, rows] C``:
    ``2·out`` per pair. Then one product ``W' = [U_G[:, :a] P] [Q; U_A[:, :b]ᵀ]``. Every product is counted; the
    first ``have`` rows of ``X`` and columns of ``Y`` (:class:`HalfProducts`) are free.
    """
    n = c.size
    a = np.arange(n + 1, dtype=np.float64)
    full_row = np.arange(n) < np.count_nonzero(c == in_dim)
    best = (0, 0, math.inf)
    for g in {0, int(c[-1]) if n == out_dim else 0}:
        b = np.maximum(np.concatenate([c, [0]]), g).astype(np.float64)
        rest = (c - g).astype(np.float64)  # per row, the pairs outside the g full columns
        head = np.concatenate([[0], np.cumsum(np.where(full_row, g, rest))]) * in_dim
        tail = np.concatenate([np.cumsum(rest[::-1])[::-1], [0]]) * out_dim
        halves = np.maximum(a - have[0], 0) + np.maximum(b - have[1], 0)
        cost = out_dim * in_dim * (a + b + halves) + 2.0 * _PAD * (head + tail)
        k = int(np.argmin(cost))
        best = min(best, (k, g, float(cost[k])), key=lambda plan: plan[2])
    return best


def staircase_cost(counts, out_dim: int, in_dim: int, halves: HalfProducts | None = None) -> float:
    """Multiply-adds :func:`project_weight` spends on a staircase, by its cost model, with ``halves`` as they
    stand (the dense projection costs ``2·out·in·(out + in)``)."""
    c = _as_counts(counts)
    c = np.sort(c[c > 0])[::-1]
    have = (halves.rows("lead"), halves.rows("trail")) if halves is not None else (0, 0)
    return _staircase_plan(c, out_dim, in_dim, have)[2] if c.size else 0.0


def _blocks(extent: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of a non-increasing positive ``extent`` whose values lie within ``_BLOCK_RATIO``."""
    out, start, neg = [], 0, -extent
    while start < extent.size:
        stop = max(int(np.searchsorted(neg, -extent[start] / _BLOCK_RATIO, side="right")), start + 1)
        out.append((start, stop))
        start = stop
    return out


def _project_staircase(
    w, u_grad: torch.Tensor, u_act: torch.Tensor, counts: np.ndarray, halves: HalfProducts | None
) -> torch.Tensor | None:
    """``U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ`` in the compute dtype where row ``i`` of ``M`` is the prefix
    ``[0, counts[i])`` (see :func:`_staircase_plan`); ``w()`` gives ``W`` in the compute dtype; ``None`` when
    ``M`` is empty."""
    out_dim, in_dim = u_grad.shape[0], u_act.shape[0]
    device = u_grad.device
    order = np.argsort(-counts, kind="stable")
    cs = counts[order]
    n_rows = int(np.count_nonzero(cs))
    if n_rows == 0:
        return None
    cs = cs[:n_rows]
    identity = bool((order[:n_rows] == np.arange(n_rows)).all())
    order_t = None if identity else torch.from_numpy(order[:n_rows].copy()).to(device)
    cs_t = torch.from_numpy(cs.copy()).to(device)
    if halves is None or not identity or not halves.fits(u_grad):  # reusable in the basis' order, dtype, device
        halves = HalfProducts()

    def grad_cols(start: int, stop: int) -> torch.Tensor:
        return u_grad[:, start:stop] if identity else u_grad.index_select(1, order_t[start:stop])

    a, g, _ = _staircase_plan(cs, out_dim, in_dim, (halves.rows("lead"), halves.rows("trail")))
    b = max(int(cs[a]) if a < n_rows else 0, g)
    left, right = [], []
    if a > 0:  # rows [0, a), column-wise
        x = halves.prefix("lead", a, lambda lo, hi: grad_cols(lo, hi).T @ w())
        f = min(int(np.count_nonzero(cs == in_dim)), a)  # rows keeping every column
        q = torch.zeros(a, in_dim, dtype=x.dtype, device=device)
        q[:f] = x[:f]
        if g and f:
            q[:f].addmm_(x[:f] @ u_act[:, :g], u_act[:, :g].T, alpha=-1)
        # per column j >= g, the rows in [f, a) keeping it
        heights = np.searchsorted(-cs[:a], -np.arange(g, int(cs[f]) if f < a else g), side="left") - f
        for start, stop in _blocks(heights):
            h = f + int(heights[start])
            ua = u_act[:, g + start : g + stop]
            coeffs = x[f:h] @ ua
            coeffs.mul_(torch.arange(g + start, g + stop, device=device).unsqueeze(0) < cs_t[f:h].unsqueeze(1))
            q[f:h].addmm_(coeffs, ua.T)
        left.append(grad_cols(0, a))
        right.append(q)
    if b > 0:  # columns [0, g) whole, rows [a, n) row-wise: P = Y[:, :g] + Σ U_G[:, rows] ((U_G[:, rows]ᵀ Y) ⊙ M)
        # As Yᵀ and Pᵀ (b × out): a CPU BLAS multiplies a short-wide Yᵀ by a column slice of U_G ~15x faster than
        # the slice's transpose by a tall-skinny Y (measured at 11008 × 4096, one thread).
        y_t = halves.prefix("trail", b, lambda lo, hi: u_act[:, lo:hi].T @ w().T)
        p_t = torch.zeros(b, out_dim, dtype=y_t.dtype, device=device)
        p_t[:g] = y_t[:g]
        for start, stop in _blocks(cs[a : int(np.count_nonzero(cs > g))] - g):
            start, stop = start + a, stop + a
            width = int(cs[start])
            ug = grad_cols(start, stop)
            coeffs_t = y_t[g:width] @ ug  # (width - g, rows)
            coeffs_t.mul_(torch.arange(g, width, device=device).unsqueeze(1) < cs_t[start:stop].unsqueeze(0))
            p_t[g:width].addmm_(coeffs_t, ug.T)
        left.append(p_t.T)
        right.append(u_act[:, :b].T)
    return torch.cat(left, 1) @ torch.cat(right, 0)  # one product: W' is written once


def project_weight(
    weight: torch.Tensor,
    grad_eig: Eigen,
    act_eig: Eigen,
    mask: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    halves: HalfProducts | None = None,
) -> torch.Tensor:
    """``W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ``, in the weight's dtype/device.

    ``mask``: staircase counts (:func:`select_pairs`, :func:`independent_counts`) or a bool ``(out, in)`` mask; a
    staircase (or a mask whose rows are prefixes) is projected through half-products as :func:`_staircase_plan`
    says, which ``halves`` (of this weight and bases) keeps for the next call; any other mask the general way.
    Eigenvectors are used in the compute dtype (:meth:`Eigen.vectors_as`).
    """
    out_dim, in_dim = weight.shape
    counts = _is_counts(mask)
    if (counts and mask.numel() != out_dim) or (not counts and tuple(mask.shape) != (out_dim, in_dim)):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(out_dim, in_dim)} or ({out_dim},)")
    if grad_eig.size != out_dim or act_eig.size != in_dim:
        raise ValueError(
            f"eigenbases of size G {grad_eig.size}, A {act_eig.size} do not fit a weight of shape {(out_dim, in_dim)}"
        )
    dtype = compute_dtype or _compute_dtype(weight)
    device = weight.device
    w = functools.cache(lambda: weight.detach().to(device=device, dtype=dtype))  # cast once, only when needed
    u_grad = grad_eig.to(device).vectors_as(dtype)
    u_act = act_eig.to(device).vectors_as(dtype)
    if counts:
        c = _as_counts(mask)
        if int(c.max(initial=0)) > in_dim or int(c.min(initial=0)) < 0:
            raise ValueError(f"counts must lie in [0, {in_dim}]")
        rank = _descending_rank(act_eig.values)
        if rank is not None:  # the kept columns are the top by μ: put them first
            u_act = u_act.index_select(1, torch.from_numpy(np.argsort(rank, kind="stable")).to(device))
    else:
        mask = mask.to(device)
        c = _row_extents(mask)
        if not bool((c == _row_sums(mask)).all()):  # some row not a prefix: the general path
            return _project_any(w(), u_grad, u_act, mask).to(weight.dtype)
        c = c.cpu().numpy()
    result = _project_staircase(w, u_grad, u_act, c, halves)
    return torch.zeros_like(weight) if result is None else result.to(weight.dtype)


def _project_any(w: torch.Tensor, u_grad: torch.Tensor, u_act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The general path of :func:`project_weight`: rows in blocks of similar extent, each projected on both sides."""
    extents = _row_extents(mask)
    order = torch.argsort(extents, descending=True, stable=True)
    ext = extents[order].cpu().numpy()
    result = torch.zeros_like(w)
    for start, stop in _blocks(ext[: int(np.count_nonzero(ext))]):
        rows = order[start:stop]
        ug = u_grad.index_select(1, rows)
        ua = u_act[:, : int(ext[start])]
        coeffs = (ug.T @ w) @ ua
        coeffs.mul_(mask.index_select(0, rows)[:, : ua.shape[1]])
        result.addmm_(ug, coeffs @ ua.T)
    return result


def edit_weight(
    weight: torch.Tensor, activation_cov: torch.Tensor, grad_cov: torch.Tensor, keep_mass: float
) -> torch.Tensor:
    """The K-FAC edit of one weight ``(out, in)`` from ``A`` ``(in, in)`` and ``G`` ``(out, out)``: ``W'`` in the
    weight's dtype and device, keeping the top-mass pairs holding ``keep_mass`` (``>= 1``: a copy of ``W``)."""
    out_dim, in_dim = weight.shape
    if tuple(activation_cov.shape) != (in_dim, in_dim) or tuple(grad_cov.shape) != (out_dim, out_dim):
        raise ValueError(
            f"weight {tuple(weight.shape)} (out, in) needs A ({in_dim}, {in_dim}) and G ({out_dim}, {out_dim}); "
            f"got A {tuple(activation_cov.shape)} and G {tuple(grad_cov.shape)}"
        )
    if keep_mass >= 1.0:
        return weight.detach().clone()
    act_eig = eigendecompose(activation_cov.to(weight.device), "activation_cov")
    grad_eig = eigendecompose(grad_cov.to(weight.device), "grad_cov")
    counts = select_pairs(grad_eig.values, act_eig.values, keep_mass)
    return project_weight(weight, grad_eig, act_eig, counts)


def svd_truncate(weight: torch.Tensor, keep_mass: float) -> tuple[torch.Tensor, int, float]:
    """Data-free baseline: keep the top singular directions of ``W`` holding ``keep_mass`` of Σσ².

    Returns ``(W', rank, kept fraction of Σσ²)``."""
    out_dim, in_dim = weight.shape
    if keep_mass >= 1.0:
        return weight.detach().clone(), min(out_dim, in_dim), 1.0
    w64 = weight.detach().to(torch.float64)
    # The right (or left) singular vectors are the eigenvectors of the smaller Gram matrix; σ² its eigenvalues.
    gram = w64.T @ w64 if in_dim <= out_dim else w64 @ w64.T
    eig = eigendecompose(gram, "svd gram")
    rank = truncation_rank(eig.values, keep_mass)
    total = float(eig.values.sum())
    energy = float(eig.values[:rank].sum()) / total if total > 0 else 0.0
    dtype = _compute_dtype(weight)
    basis = eig.vectors[:, :rank].to(dtype)
    w = weight.detach().to(dtype)
    edited = (w @ basis) @ basis.T if in_dim <= out_dim else basis @ (basis.T @ w)
    return edited.to(weight.dtype), rank, energy


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random ``n × n`` orthogonal matrix (QR of a Gaussian with the sign fix), generated on the CPU."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_basis_edit(weight: torch.Tensor, n_keep: int, seed: int = 0) -> torch.Tensor:
    """Control: keep ``n_keep`` coefficients, at uniformly random positions, of ``W`` in a random orthogonal basis
    pair (``Q_out`` ``(out, out)``, ``Q_in`` ``(in, in)``): ``W' = Q_out ((Q_outᵀ W Q_in) ⊙ M) Q_inᵀ``. With the
    K-FAC edit's pair count it asks whether the curvature basis matters. Costs a dense projection and two QRs."""
    out_dim, in_dim = weight.shape
    n_keep = int(min(max(n_keep, 0), out_dim * in_dim))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dtype = _compute_dtype(weight)
    q_out = random_orthogonal(out_dim, gen, dtype).to(weight.device)
    q_in = random_orthogonal(in_dim, gen, dtype).to(weight.device)
    keep = torch.randperm(out_dim * in_dim, generator=gen)[:n_keep].to(weight.device)
    coeffs = ((q_out.T @ weight.detach().to(dtype)) @ q_in).view(-1)
    kept = torch.zeros_like(coeffs)
    kept[keep] = coeffs[keep]
    return ((q_out @ kept.view(out_dim, in_dim)) @ q_in.T).to(weight.dtype)
