"""Run under ``torchrun --nproc-per-node 2`` by tests/test_distributed.py (not a test module itself).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_script.py OUT -- COLLECT_ARGS...``:
each rank joins the process group from the launcher's environment and runs ``kfac-edit collect COLLECT_ARGS --out
OUT/factors`` (the CLI, which uses an existing group as it is, as under ``accelerate``), then the ranks spread the eigendecompositions of the written factors over themselves
(:func:`kfac_edit.eigen.distributed_eigendecompose`) and each saves what its cache holds to OUT/eigen{rank}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> int:
    out = Path(sys.argv[1])
    collect_args = sys.argv[sys.argv.index("--") + 1 :]
    torch.set_num_threads(1)
    from kfac_edit.cli import main as cli_main
    from kfac_edit.eigen import EigenCache, distributed_eigendecompose
    from kfac_edit.factors.distributed import all_reduce_ints, init_distributed, shutdown
    from kfac_edit.factors.store import Factors

    ctx = init_distributed("cpu", timeout_s=60)  # the CLI uses this group as it is and leaves it alive
    code = cli_main(["collect", *collect_args, "--out", str(out / "factors")])
    if code != 0:
        return code
    all_reduce_ints(ctx, [0])  # barrier: rank 0 has written the factors
    factors = Factors.load(out / "factors")
    cache = EigenCache(None)
    assignment = distributed_eigendecompose(factors, factors.names, cache, ctx)
    eig = {name: cache.get(factors, name) for name in factors.names}  # all memory hits now
    torch.save(
        {
            "computed": assignment.computed,
            "stats": (cache.stats.computed, cache.stats.memory_hits),
            "eigen": {n: (g.values, g.vectors, a.values, a.vectors) for n, (g, a) in eig.items()},
        },
        out / f"eigen{ctx.rank}.pt",
    )
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
