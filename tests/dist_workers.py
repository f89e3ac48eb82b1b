"""Process bodies for tests/test_distributed.py, kept light (torch only) so that spawned processes start fast."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def failing_worker(rank: int, world: int, port: int, tmp: str, mode: str) -> None:
    """Rank 1 dies (``mode="dies"``) or hangs (``"hangs"``) right after joining; rank 0 then enters a collective and
    reports what happened."""
    from kfac_edit.factors.distributed import RankFailure, all_reduce_ints, init_distributed

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on how the host name resolves
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=5)
    if rank == 1:
        if mode == "hangs":
            time.sleep(120)  # stuck (the test kills it once rank 0 has reported)
        os._exit(3)  # dies without a word, as a killed process would
    start = time.perf_counter()
    try:
        all_reduce_ints(ctx, [1], what="checkpoint all-reduce")
        message = "no error"
    except RankFailure as exc:
        message = str(exc)
    Path(tmp, "rank0.json").write_text(json.dumps({"message": message, "seconds": time.perf_counter() - start}))
    os._exit(0)  # as the CLI does: a process group with a lost peer cannot be torn down cleanly
