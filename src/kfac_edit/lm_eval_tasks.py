"""Downstream tasks through lm-evaluation-harness (the optional ``lm_eval`` package, extra ``[lm-eval]``).

An edited model directory is a standard Hugging Face model directory, so lm-eval's ``hf`` backend loads it as it
is. :func:`run_lm_eval` runs a list of tasks (built-in names such as ``arithmetic``, ``triviaqa``, ``gsm8k``, or tasks
defined in YAML files under ``include_path``) and writes their results to ``OUT_DIR/lm_eval_results.json``::

    {"model": "...", "tasks": [...], "include_path": ..., "limit": ..., "num_fewshot": ..., "batch_size": ...,
     "device": "...", "dtype": "...", "lm_eval_version": "0.4.x", "timestamp": "...", "seconds": 12.3,
     "metrics": {"arithmetic_2da": {"acc": 0.91, "acc_stderr": 0.01}, ...},   # per task, numeric metrics only
     "results": {...}, "n-shot": {...}, "n-samples": {...}, "versions": {...}, "configs": {...}}  # lm-eval's own

Metric names drop lm-eval's filter suffix (``acc,none`` -> ``acc``; other filters keep theirs: ``exact_match,flexible``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .constants import LM_EVAL_RESULTS_FILE, LM_EVAL_SAMPLES_FILE
from .errors import UserError, first_line
from .fileio import atomic_path, utc_timestamp, write_json

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'kfac-edit[lm-eval]'"


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"arithmetic,triviaqa"`` or a list -> ``["arithmetic", "triviaqa"]`` (order kept, duplicates dropped)."""
    parts = [tasks] if isinstance(tasks, str) else tasks
    out = list(dict.fromkeys(t.strip() for part in parts for t in str(part).split(",") if t.strip()))
    if not out:
        raise UserError("no lm-eval task given; pass e.g. --lm-eval-tasks arithmetic,triviaqa")
    return out


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as exc:
        raise UserError(f"lm-evaluation-harness is not installed ({exc}); install it with {INSTALL_HINT}") from None
    return lm_eval


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """A TaskManager that knows ``tasks``: only the include path when it defines them all (fast), else all tasks."""
    if include_path is not None:
        if not os.path.exists(include_path):
            raise UserError(f"--lm-eval-include {include_path} does not exist; give a directory of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        import difflib

        close = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in missing}
        hints = [f"'{t}'" + (f" (did you mean {', '.join(c)}?)" if c else "") for t, c in close.items()]
        where = f" in lm-eval or {include_path}" if include_path else " in lm-eval (add --lm-eval-include DIR for your own)"
        raise UserError(f"unknown lm-eval task {'; '.join(hints)}{where}; `lm-eval ls tasks` lists them")
    return manager


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task, its numeric metrics with the ``,none`` filter suffix dropped (``alias`` and strings removed)."""
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len"
        }
        for task, metrics in results.get("results", {}).items()
    }


def run_lm_eval(model_path: str | os.PathLike, tasks: str | Sequence[str], out_dir: str | os.PathLike,
                include_path: str | os.PathLike | None = None, limit: int | float | None = None,
                batch_size: int | str = 8, device: str | None = "auto", dtype: str = "auto",
                num_fewshot: int | None = None, seed: int = 0,
                log_samples: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run lm-eval's ``hf`` backend on ``model_path`` (a hub id or model directory) and write the results file.

    Args:
        tasks: task or group names, comma-separated or a list.
        include_path: a directory of extra task YAML files (e.g. a local task over a local JSONL).
        limit: at most this many documents per task (a fraction < 1 means that share), for quick checks.
        batch_size: lm-eval batch size (an int, or ``"auto"``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: resolved by :func:`kfac_edit.models.resolve_dtype` and passed to lm-eval by name (recorded as run).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        log_samples: also write each document's responses to ``OUT_DIR/lm_eval_samples.jsonl`` (``task``,
            ``doc_id``, ``doc``, ``target``, ``arguments``, ``responses``, per-document metrics) and return them
            under ``"samples"``.
    Returns the dict written to ``OUT_DIR/lm_eval_results.json`` (layout in the module docstring).
    """
    from .models import dtype_name, resolve_device, resolve_dtype

    task_list = parse_tasks(tasks)
    lm_eval = _import_lm_eval()
    include = os.fspath(include_path) if include_path is not None else None
    manager = _task_manager(lm_eval.tasks.TaskManager, task_list, include)
    model_path = os.fspath(model_path)
    dtype = dtype_name(resolve_dtype(model_path, dtype))
    dev = str(resolve_device(device))
    log.info("lm-eval: %s on %s (%s)", ",".join(task_list), model_path, dev)
    start = time.perf_counter()
    seeds = dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), seed)
    try:
        raw = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": model_path, "dtype": dtype}, tasks=task_list,
            num_fewshot=num_fewshot, batch_size=batch_size, device=dev, limit=limit, task_manager=manager,
            log_samples=log_samples, **seeds,
        )  # fmt: skip
    except ConnectionError as exc:  # a task's dataset is on the hub and the hub cannot be reached
        raise UserError(f"lm-eval cannot fetch the data of {','.join(task_list)} ({first_line(exc)}); run where the "
                        "Hugging Face hub is reachable, or with the datasets in the local cache") from None
    except FileNotFoundError as exc:  # a local task's data_files: datasets reads them relative to the working dir
        raise UserError(f"lm-eval cannot read the data of {','.join(task_list)} ({first_line(exc)}); a task YAML's "
                        f"data_files are relative to the working directory ({os.getcwd()}): run from the directory "
                        "they are relative to, or give absolute paths") from None
    seconds = time.perf_counter() - start
    if raw is None:  # non-zero ranks under distributed lm-eval
        return {}
    samples = _sample_rows(raw.get("samples", {})) if log_samples else []
    raw = {k: v for k, v in dict(raw).items() if k != "samples"}
    raw = json.loads(json.dumps(raw, default=str))  # lm-eval's dicts hold a few non-JSON objects
    record = {
        "model": model_path, "tasks": task_list, "include_path": include, "limit": limit, "num_fewshot": num_fewshot,
        "batch_size": batch_size, "device": dev, "dtype": dtype,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "timestamp": utc_timestamp(),
        "seconds": round(seconds, 3),
        "metrics": summarize(raw),
    }  # fmt: skip
    kept = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better", "configs")
    record.update({key: raw[key] for key in kept if key in raw})
    write_json(Path(out_dir) / LM_EVAL_RESULTS_FILE, record)
    if log_samples:
        with atomic_path(Path(out_dir) / LM_EVAL_SAMPLES_FILE) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in samples))
        record = dict(record, samples=samples)
    return record


def _sample_rows(samples: dict[str, list[dict]]) -> list[dict[str, Any]]:
    rows = []
    for task, items in samples.items():
        for s in items:
            row = {"task": task} | {key: s.get(key) for key in ("doc_id", "doc", "target", "arguments")}
            row["responses"] = s.get("filtered_resps")
            row.update({m: s[m] for m in s.get("metrics", []) if m in s})
            rows.append(row)
    # numpy scalars as numbers, other objects as strings
    return json.loads(json.dumps(rows, default=lambda obj: obj.item() if hasattr(obj, "item") else str(obj)))


# ---------------------------------------------------------------------------------------------- `kfac-edit eval`
def add_lm_eval_arguments(p) -> None:
    """``--lm-eval-tasks``, ``--lm-eval-include``, ``--lm-eval-limit`` (for ``kfac-edit eval``)."""
    p.add_argument(
        "--lm-eval-tasks",
        metavar="TASKS",
        help="also run these lm-evaluation-harness tasks on MODEL, comma-separated (e.g. arithmetic,triviaqa,gsm8k); "
        f"results go to lm_eval/<model>/{LM_EVAL_RESULTS_FILE} beside --out; needs {INSTALL_HINT}",
    )
    p.add_argument("--lm-eval-include", metavar="DIR", help="directory of your own lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=float, metavar="N",
                   help="at most N documents per lm-eval task (a fraction < 1: that share), for quick checks")


def lm_eval_out_dir(model: str, out: str | os.PathLike | None) -> Path:
    """``<directory of --out>/lm_eval/<model label>/`` (the working directory without ``--out``); the label is
    the model directory's name, or the hub id with ``/`` replaced by ``__``."""
    path = Path(model)
    label = path.name if path.exists() else model.replace("/", "__")
    base = Path(out).parent if out else Path(".")
    return base / "lm_eval" / label


def check_lm_eval_args(args) -> None:
    """Fail fast (before other evaluations run) on a missing lm_eval package, no task, or a missing include dir."""
    if not getattr(args, "lm_eval_tasks", None):
        if getattr(args, "lm_eval_include", None) or getattr(args, "lm_eval_limit", None):
            raise UserError("--lm-eval-include/--lm-eval-limit need --lm-eval-tasks TASKS")
        return
    parse_tasks(args.lm_eval_tasks)
    _import_lm_eval()
    if args.lm_eval_include and not os.path.isdir(args.lm_eval_include):
        raise UserError(f"--lm-eval-include {args.lm_eval_include} is not a directory; give a directory of task YAMLs")
    if args.lm_eval_limit is not None and not 0 < args.lm_eval_limit < math.inf:
        raise UserError(f"--lm-eval-limit {args.lm_eval_limit} must be a positive number (documents, or a share < 1)")


def run_lm_eval_from_args(args) -> dict[str, Any] | None:
    """What ``kfac-edit eval --lm-eval-tasks`` runs after its own metrics; prints the metrics and the file."""
    if not getattr(args, "lm_eval_tasks", None):
        return None
    limit = args.lm_eval_limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    out_dir = lm_eval_out_dir(args.model, getattr(args, "out", None))
    record = run_lm_eval(args.model, args.lm_eval_tasks, out_dir, include_path=args.lm_eval_include, limit=limit,
                         batch_size=getattr(args, "batch_size", 8), device=getattr(args, "device", "auto"),
                         dtype=getattr(args, "dtype", "auto"))  # fmt: skip
    for task, metrics in record.get("metrics", {}).items():
        for name, value in metrics.items():
            if "_stderr" not in name:  # the console shows the values, the file their standard errors too
                print(f"lm-eval {task:<32} {name:<24} {value:.4f}")
    print(f"wrote lm-eval results to {out_dir / LM_EVAL_RESULTS_FILE}")
    return record
