"""Throughput of K-FAC factor collection against a plain training forward+backward of the same model and batch.

Three measurements in one run, on the same model and the same random batch of ``--batch-size`` x ``--seq-len``
tokens:

* ``train``: a plain training step, ``model(input_ids, labels).loss.backward()`` with weight gradients (the baseline);
* ``frozen``: forward + backward with frozen weights down to the embeddings, no factors (what collection cannot
  avoid; the gap to ``collect`` is the cost of the covariance products);
* ``collect``: :class:`kfac_edit.factors.FactorCollector` over every block x gate, up, down, one pass.

It prints (and with ``--out`` writes) JSON with the configuration, tokens/s of each, the ratio collect/train and the
memory the factors take. Goal (issue 2): ratio >= 0.6 on one H100/H200 for the OLMo-2-7B shape (the reference
workflow reaches ~0.1 for all blocks).

The model is random-initialized from an OLMo-2 config: the default shape is OLMo-2-7B's (hidden 4096, MLP 11008,
32 blocks, vocabulary 100352, seq 512) in bf16 on CUDA. All-block fp32 factors of that shape take ~51 GB: on an
80 GB H100 use ``--batch-size 2`` or ``--gradient-checkpointing`` if batch 4 runs out of memory (an H200 fits).
``--preset tiny-cpu`` is a small fp32 model that runs in well under a minute on two CPU cores.

    python benchmarks/collect_throughput.py                      # 7B-shaped, cuda
    python benchmarks/collect_throughput.py --preset tiny-cpu    # CPU smoke run

Times are wall (``perf_counter``) and CPU (``process_time``) medians; the CPU ratio is the one to trust on a shared
machine. Measured 2026-12-01 on a shared 2-core box, one thread, ``--preset tiny-cpu --hidden 512 --mlp 1536
--layers 8 --seq-len 256 --batch-size 4 --threads 1 --steps 3 --warmup 1`` (issue 14's shape): with full Gram
updates collect/train was 0.80x CPU time (0.78x wall); with symmetric accumulation (upper block triangle, 8 row
blocks, mirrored on read) 1.06x CPU time (1.09x wall): collect 3.10 s vs train 3.30 s and frozen 2.14 s per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from kfac_edit.factors.collector import FactorCollector
from kfac_edit.factors.memory import factor_nbytes
from kfac_edit.models import find_projections
from _presets import apply_preset  # sibling module: benchmarks/ is on sys.path
from _timing import measure_interleaved

PRESETS = {
    "olmo2-7b": dict(
        hidden=4096, mlp=11008, layers=32, heads=32, vocab=100352, dtype="bfloat16", device="cuda",
        seq_len=512, batch_size=4, steps=5, warmup=2, labels="sampled",
    ),
    "olmo2-1b": dict(
        hidden=2048, mlp=8192, layers=16, heads=16, vocab=100352, dtype="bfloat16", device="cuda",
        seq_len=512, batch_size=8, steps=5, warmup=2, labels="sampled",
    ),
    "tiny-cpu": dict(
        hidden=128, mlp=344, layers=4, heads=4, vocab=2048, dtype="float32", device="cpu",
        seq_len=128, batch_size=8, steps=5, warmup=1, labels="sampled", threads=1,
    ),
}  # fmt: skip
for _preset in PRESETS.values():
    _preset.setdefault("threads", 0)  # 0: torch's default


def build_model(args):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=max(4096, args.seq_len),
        bos_token_id=args.vocab - 4, eos_token_id=args.vocab - 3, pad_token_id=args.vocab - 2,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize directly in the target dtype (no fp32 copy of a 7B model)
    try:
        with torch.device(args.device):
            model = Olmo2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()




def time_interleaved(steps_by_name: dict, steps: int, warmup: int, device: str) -> dict[str, tuple[float, float]]:
    """``{name: (wall, cpu)}``: median seconds per step of each kind after ``warmup`` untimed rounds. The kinds are
    taken in turn, so that a shared machine's changing load hits all of them alike; on a GPU pass one kind at a
    time to get each one's peak memory."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    timings = measure_interleaved(steps_by_name, steps, sync=lambda: sync(device))
    for name, t in timings.items():
        print(f"{name}: {t} per step (median of {steps}, interleaved)", file=sys.stderr, flush=True)
    return {name: (t.wall, t.cpu) for name, t in timings.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="olmo2-7b")
    for key, value in PRESETS["olmo2-7b"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint blocks in both runs")
    parser.add_argument("--skip-train", action="store_true", help="measure collection only")
    parser.add_argument(
        "--skip-collect", action="store_true", help="measure the baselines only, without allocating factors (when "
        "factors and weight gradients do not fit on the GPU together: run once with each --skip-*)"
    )
    parser.add_argument("--out", help="write the results JSON here too")
    args = parser.parse_args(argv)
    if not apply_preset(args, PRESETS):
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab - 4, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = ids.numel()
    projections = find_projections(model)
    sizes = factor_nbytes(projections, torch.float32)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "heads", "vocab", "dtype")},
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens_per_step": tokens,
        "steps": args.steps, "warmup": args.warmup, "labels": args.labels, "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "modules": len(projections), "factor_gb_fp32": sum(sizes.values()) / 2**30,
    }  # fmt: skip
    print(f"{len(projections)} modules, factors {result['factor_gb_fp32']:.1f} GB fp32", file=sys.stderr)

    def train_step():  # 1. a plain training step with weight gradients: the baseline
        model.requires_grad_(True)
        if args.gradient_checkpointing:
            model.train()  # HF checkpoints only in training mode (OLMo-2 has no dropout at its defaults)
        model(**batch, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.eval()

    def frozen_step():  # 2. forward + backward to the embeddings with frozen weights, no factors
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
        del logits
        torch.autograd.grad(loss, embeds)

    def record(name, times):
        wall, cpu = times
        result[name] = {
            "seconds_per_step": wall, "tokens_per_s": tokens / wall, "cpu_seconds_per_step": cpu,
            "tokens_per_cpu_s": tokens / max(cpu, 1e-12), "peak_gb": peak_gb(args.device),
        }  # fmt: skip

    model.requires_grad_(False)
    try:
        # 3. factor collection, every block x gate/up/down in one pass
        collecting = contextlib.nullcontext() if args.skip_collect else FactorCollector(model, projections, args.labels)
        with collecting as collector:
            steps = {"collect": lambda: collector.accumulate(batch), "frozen": frozen_step}
            if collector is None:
                del steps["collect"]
            if not args.skip_train:
                steps["train"] = train_step
            if args.device.startswith("cuda"):  # a GPU of its own: one kind after the other, peak memory of each
                for name in ("train", "frozen", "collect"):
                    if name in steps:
                        reset_peak(args.device)
                        record(name, time_interleaved({name: steps[name]}, args.steps, args.warmup, args.device)[name])
            else:
                for name, seconds in time_interleaved(steps, args.steps, args.warmup, args.device).items():
                    record(name, seconds)
        if collector is not None:
            finite = all(bool(torch.isfinite(t).all()) for t in collector.factors.tensors())
            result["collect"].update(labelled_tokens=collector.labelled_tokens, factors_finite=finite)
    except torch.OutOfMemoryError as exc:
        result.setdefault("collect", {})["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    if "train" in result and "tokens_per_s" in result.get("collect", {}):
        result["ratio_collect_over_train"] = result["collect"]["tokens_per_s"] / result["train"]["tokens_per_s"]
        result["cpu_ratio_collect_over_train"] = result["train"]["cpu_seconds_per_step"] / result["collect"]["cpu_seconds_per_step"]
    if "tokens_per_s" in result.get("collect", {}):
        result["ratio_collect_over_frozen"] = result["collect"]["tokens_per_s"] / result["frozen"]["tokens_per_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if "ratio_collect_over_train" in result:
        print(
            f"collect / train throughput: {result['ratio_collect_over_train']:.2f}x wall, "
            f"{result['cpu_ratio_collect_over_train']:.2f}x CPU time",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
