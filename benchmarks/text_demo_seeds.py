"""The text demo (``kfac-edit demo --testbed text``) on the default text testbed of several seeds.

Each seed builds (or loads) ``TextTestbedConfig(seed=s)`` and runs :func:`kfac_edit.demo.run_demo` with
``DemoConfig.text(seed=s)`` unchanged; the JSON keeps each run's ``summary.json``, checks, cost tables and timings.

    python benchmarks/text_demo_seeds.py --seeds 0 1 2 --out benchmarks/results/text_demo_seeds.json [--cache-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kfac_edit.demo import DemoConfig, run_demo
from kfac_edit.text_testbed import TextTestbedConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_demo_seeds.json"))
    parser.add_argument("--cache-dir", help="testbed cache root (default $KFAC_EDIT_CACHE)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = {"kind": "text_demo_seeds", "torch_threads": 1, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            config = DemoConfig.text(testbed=TextTestbedConfig(seed=seed), seed=seed)
            t0, w0 = time.process_time(), time.perf_counter()
            results = run_demo(config, Path(tmp) / f"seed{seed}", cache_dir=args.cache_dir, progress=False)
            summary = json.loads((Path(tmp) / f"seed{seed}" / "summary.json").read_text())
            out["runs"].append({"seed": seed, "summary": summary, "checks": results["checks"],
                                "matched": results["matched"], "timings_s": results["timings_s"],
                                "testbed_cached": results["testbed"]["cached"],
                                "cpu_s": round(time.process_time() - t0, 1), "wall_s": round(time.perf_counter() - w0, 1),
                                "table": results["table"]})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
            print(results["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
