"""Throughput of the evaluation suite: memorization records/s and nDCG tokens/s.

Memorization: ``--records`` random records of ``--prefix-len`` + ``--suffix-len`` tokens are scored three ways in
the same run, on the same model: batched greedy decoding with left padding and the KV cache (what ``kfac-edit eval``
does without true suffixes, at each ``--batch-sizes``), one record at a time (the same loop at batch 1, on
``--single-records`` of them), and against Hugging Face ``model.generate(do_sample=False)`` at the first batch size
(on ``--hf-records``, ``--repeats`` interleaved runs, medians): ``greedy_generate`` without a draft and with the
true suffixes as drafts, for suffixes the model recites (``memorized``: its own greedy continuation), does not
(``unmemorized``) and recites for a uniform 0..L tokens (``partial``); and a loop that does nothing but the same
model forwards (``forward_floor``: prefill, then one cached one-token forward per new token), whose ratio bounds
what any loop around that forward can gain over ``model.generate``. ``--testbed`` adds the quick arithmetic
testbed's trained model: its canaries as trained and after SVD truncation (keep_mass 0.8, 0.7), and its held-out
rule sequences. Tokens must equal ``model.generate``'s (exit status 1 otherwise). nDCG: the reference top-k pass and
the evaluated nDCG pass over ``--ndcg-tokens`` tokens of random number text (word-level tokenizer, so one word = one
token) in windows of ``--ndcg-seq-len``.

The model is random-initialized from an OLMo-2 config: the default shape is OLMo-2-7B's (hidden 4096, MLP 11008,
32 blocks, vocabulary 100352) in bf16 on CUDA; ``--preset tiny-cpu`` is a small fp32 model that runs in under a
minute on two CPU cores (one torch thread: ``--threads``; 0 keeps torch's default). Times: CPU time
(``time.process_time``) on a CPU and wall time on a GPU, both recorded (``cpu_seconds``, ``wall_seconds``). Goal (issue 7, one GPU, 7B shape): 500 records of 64 + 48 in <= 10 s, nDCG over 200k
tokens at seq 1024 in <= 10 s.

    python benchmarks/eval_throughput.py                      # 7B-shaped, cuda
    python benchmarks/eval_throughput.py --preset tiny-cpu    # CPU smoke run
    python benchmarks/eval_throughput.py --preset tiny-cpu --hf-records 96 --repeats 5 --testbed --out F.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from kfac_edit.evaluate.memorization import greedy_generate
from kfac_edit.evaluate.ndcg import ndcg_at_k, topk_over_source
from kfac_edit.testbed import number_tokenizer
from _presets import apply_preset  # sibling module: benchmarks/ is on sys.path
from _timing import measure

PRESETS = {
    "olmo2-7b": dict(
        hidden=4096, mlp=11008, layers=32, heads=32, vocab=100352, dtype="bfloat16", device="cuda",
        records=500, prefix_len=64, suffix_len=48, batch_sizes="32,128,512", single_records=8, hf_records=128,
        ndcg_tokens=200_000, ndcg_seq_len=1024, forward_tokens=16384, threads=0,
    ),
    "tiny-cpu": dict(
        hidden=64, mlp=172, layers=2, heads=4, vocab=1024, dtype="float32", device="cpu",
        records=192, prefix_len=32, suffix_len=24, batch_sizes="32,64", single_records=24, hf_records=32,
        ndcg_tokens=20_000, ndcg_seq_len=256, forward_tokens=4096, threads=1,
    ),
}


def build_model(args):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=4096,
        bos_token_id=args.vocab - 4, eos_token_id=args.vocab - 3, pad_token_id=args.vocab - 2,
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Olmo2ForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """``(result, seconds, Timing)``: seconds are CPU time on a CPU, wall time on a GPU (both are recorded)."""
    out, t = measure(fn, sync=(lambda: sync(device)))
    return out, (t.wall if device.startswith("cuda") else t.cpu), t


def left_padded(chunk, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of the prompts ``chunk``, left-padded to the longest, both ``(len(chunk), width)``."""
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(chunk):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def hf_generate(model, prompts, num_new, batch_size, pad_id):
    """``model.generate`` greedy, left padding, exactly ``num_new`` tokens (no EOS stop)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start : start + batch_size], pad_id)
        width = ids.shape[1]
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=num_new,
                min_new_tokens=num_new, pad_token_id=pad_id, eos_token_id=None,
            )
        out += gen[:, width:].cpu().tolist()
    return out


@torch.inference_mode()
def forward_floor(model, prompts, num_new, batch_size, pad_id):
    """The least a greedy loop can do: per batch, one prefill and ``num_new - 1`` one-token forwards with the KV
    cache and argmax, no other work. Its time against ``model.generate`` bounds what any loop around the same
    forward can gain."""
    from kfac_edit.evaluate.memorization import _step

    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, prompt_mask = left_padded(prompts[start : start + batch_size], pad_id)
        width = ids.shape[1]
        mask = torch.cat([prompt_mask, torch.ones((len(ids), num_new), dtype=torch.long)], dim=1)
        ids, mask = ids.to(device), mask.to(device)
        position = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        tokens, cache = _step(model, None, ids, mask[:, :width], position, 1)
        generated = [tokens]
        for step in range(1, num_new):
            tokens, cache = _step(model, cache, tokens, mask[:, : width + step], position[:, -1:] + step, 1)
            generated.append(tokens)
        out += torch.cat(generated, 1).cpu().tolist()
    return out


def drafts_for(own: list[list[int]], workload: str, n_words: int, seed: int = 1) -> list[list[int]] | None:
    """True suffixes for a workload: the model's own greedy continuation (``memorized``), a random one
    (``unmemorized``), the greedy one for a uniform 0..L tokens then random (``partial``, as mid-edit), none (``plain``)."""
    rng = random.Random(seed)
    if workload == "plain":
        return None
    drafts = []
    for g in own:
        k = {"memorized": len(g), "unmemorized": 0, "partial": rng.randint(0, len(g))}[workload]
        tail = [rng.randrange(n_words) for _ in g[k:]]
        if tail and tail[0] == g[k]:
            tail[0] = (g[k] + 1) % n_words
        drafts.append(g[:k] + tail)
    return drafts


def versus_generate(model, prompts, num_new, workloads, batch_size, pad_id, args) -> dict:
    """``greedy_generate`` with each workload's true suffixes (``{name: suffixes or None}``) against
    ``model.generate`` (which cannot use them), interleaved, ``--repeats`` times each; ratios of the median CPU time
    on a CPU (wall on a GPU)."""
    runs = {"generate": lambda: hf_generate(model, prompts, num_new, batch_size, pad_id),
            "forward_floor": lambda: forward_floor(model, prompts, num_new, batch_size, pad_id)}
    for name, drafts in workloads.items():
        runs[name] = functools.partial(
            greedy_generate, model, prompts, num_new, batch_size=batch_size, pad_id=pad_id, targets=drafts, desc=None
        )
    times: dict[str, list] = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            outputs[name], seconds, t = timed(fn, args.device)
            times[name].append((seconds, t))
    median = {name: sorted(ts, key=lambda st: st[0])[len(ts) // 2] for name, ts in times.items()}
    hf_seconds, hf_t = median["generate"]
    out = {"records": len(prompts), "repeats": args.repeats, "generate": {"seconds": hf_seconds, **hf_t.as_dict()}}
    floor_seconds, floor_t = median["forward_floor"]
    out["forward_floor"] = {  # the bound on any loop around the same forward
        "seconds": floor_seconds, **floor_t.as_dict(), "speedup_over_generate": hf_seconds / floor_seconds,
        "same_tokens_as_generate": outputs["forward_floor"] == outputs["generate"],
    }
    print(f"forward floor: {floor_t} vs model.generate {hf_t}: {hf_seconds / floor_seconds:.2f}x", file=sys.stderr)
    for name, drafts in workloads.items():
        seconds, t = median[name]
        out[name] = {
            "seconds": seconds, **t.as_dict(), "speedup_over_generate": hf_seconds / seconds,
            "same_tokens_as_generate": outputs[name] == outputs["generate"],
            "rows_differing": sum(a != b for a, b in zip(outputs[name], outputs["generate"])),
            "suffixes_reproduced": None if drafts is None else
            sum(d[:num_new] == g for d, g in zip(drafts, outputs["generate"])) / len(prompts),
        }
        print(f"{name}: greedy_generate {t} vs model.generate {hf_t} at batch {batch_size}, {len(prompts)} records: "
              f"{out[name]['speedup_over_generate']:.2f}x, identical tokens: {out[name]['same_tokens_as_generate']}",
              file=sys.stderr)
    return out


def testbed_versus_generate(args, batch_size: int) -> dict:
    """:func:`versus_generate` on the quick arithmetic testbed's trained model (built once, cached), the true
    suffixes as drafts: its 30 canaries (memorized in training; each 4 times, for steadier timings) on the model as
    trained, with every MLP weight SVD-truncated at keep_mass 0.8 (partly memorized, as mid-edit) and at 0.7 (almost
    nothing memorized); and its 200 held-out rule sequences (continued by the learned rule)."""
    from kfac_edit.curvature import svd_truncate
    from kfac_edit.evaluate.records import load_records
    from kfac_edit.models import load_model
    from kfac_edit.testbed import TestbedConfig, build_testbed

    paths = build_testbed(TestbedConfig.quick(), progress=False)
    model, tokenizer = load_model(str(paths.model_dir), dtype="float32", device=args.device)
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if ".mlp." in name}
    out = {"testbed": str(paths.root)}
    for name, path, keep_mass, copies in (("canaries", paths.memorized, None, 4), ("rule_heldout", paths.rule_heldout,
                                          None, 1), ("canaries_svd0.8", paths.memorized, 0.8, 4),
                                          ("canaries_svd0.7", paths.memorized, 0.7, 4)):  # fmt: skip
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name in trained:
                    param.copy_(trained[param_name] if keep_mass is None else svd_truncate(trained[param_name], keep_mass)[0])
        records = load_records(path, tokenizer) * copies
        num_new = len(records[0].suffix_ids)
        assert all(len(r.suffix_ids) == num_new for r in records)
        prompts, suffixes = [r.prefix_ids for r in records], [r.suffix_ids for r in records]
        print(f"testbed {name}:", file=sys.stderr)
        out[name] = versus_generate(model, prompts, num_new, {"plain": None, "true_suffix": suffixes}, batch_size,
                                    tokenizer.pad_token_id, args)
    return out

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="olmo2-7b")
    for key, value in PRESETS["olmo2-7b"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the model.generate comparison")
    parser.add_argument("--testbed", action="store_true",
                        help="also compare with model.generate on the quick arithmetic testbed's canaries")
    parser.add_argument("--out", help="write the results JSON here too")
    args = parser.parse_args(argv)
    if not apply_preset(args, PRESETS):
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:  # small CPU models: one thread is faster, and steady on a shared machine
        torch.set_num_threads(args.threads)

    model = build_model(args)
    pad_id = args.vocab - 2
    rng = random.Random(0)
    n_words = args.vocab - 4
    prompts = [[rng.randrange(n_words) for _ in range(args.prefix_len)] for _ in range(args.records)]
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        "shape": {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "heads", "vocab", "dtype")},
        "records": args.records, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
        "memorization": {},
    }
    greedy_generate(model, prompts[:2], 2, batch_size=2, pad_id=pad_id, desc=None)  # warm-up
    batched_out = None
    for bs in batch_sizes:
        out, seconds, t = timed(
            lambda: greedy_generate(model, prompts, args.suffix_len, batch_size=bs, pad_id=pad_id, desc=None),
            args.device,
        )
        batched_out = batched_out or out
        result["memorization"][f"batched_kv_bs{bs}"] = {
            "seconds": seconds, "records_per_s": args.records / seconds, **t.as_dict()
        }
    # records the model recites by construction (its own greedy continuations as true suffixes), the draft path
    bs = batch_sizes[0]
    out, seconds, t = timed(
        lambda: greedy_generate(model, prompts, args.suffix_len, batch_size=bs, pad_id=pad_id, targets=batched_out,
                                desc=None),
        args.device,
    )
    result["memorization"][f"recited_bs{bs}"] = {
        "seconds": seconds, "records_per_s": args.records / seconds, **t.as_dict(), "same_tokens": out == batched_out,
        "seconds_for_500_records": 500 * seconds / args.records,
    }
    single = prompts[: args.single_records]
    out, seconds, t = timed(
        lambda: greedy_generate(model, single, args.suffix_len, batch_size=1, pad_id=pad_id, desc=None), args.device
    )
    result["memorization"]["one_at_a_time"] = {
        "records": len(single), "seconds": seconds, "records_per_s": len(single) / seconds, **t.as_dict(),
        "same_tokens_as_batched": sum(a == b for a, b in zip(out, batched_out)) / len(single),
    }
    if args.hf_records:
        own = batched_out[: args.hf_records]
        workloads = {w: drafts_for(own, w, n_words) for w in ("plain", "unmemorized", "partial", "memorized")}
        result["memorization"][f"vs_generate_bs{batch_sizes[0]}"] = versus_generate(
            model, prompts[: args.hf_records], args.suffix_len, workloads, batch_sizes[0], pad_id, args
        )
    if args.testbed:
        result["memorization"][f"testbed_vs_generate_bs{batch_sizes[0]}"] = testbed_versus_generate(args, batch_sizes[0])
    mem = result["memorization"]
    best = max(v["records_per_s"] for k, v in mem.items() if k.startswith("batched"))
    result["memorization"]["speedup_batched_over_one_at_a_time"] = best / mem["one_at_a_time"]["records_per_s"]
    result["memorization"]["seconds_for_500_records_best_batched"] = 500 / best

    tokenizer = number_tokenizer(n_words)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "ndcg.txt"
        words_per_doc = 500
        with open(text, "w") as fh:
            for _ in range(args.ndcg_tokens // words_per_doc + 2):
                fh.write(" ".join(str(rng.randrange(n_words)) for _ in range(words_per_doc)) + "\n")
        rows = max(1, args.forward_tokens // args.ndcg_seq_len)
        ref, ref_s, _ = timed(
            lambda: topk_over_source(model, tokenizer, str(text), 10, args.ndcg_seq_len, args.ndcg_tokens, rows, desc=None),
            args.device,
        )
        ndcg, ndcg_s, _ = timed(
            lambda: ndcg_at_k(model, tokenizer, str(text), ref, args.ndcg_seq_len, args.ndcg_tokens, rows, desc=None),
            args.device,
        )
    result["ndcg"] = {
        "tokens": ndcg["positions"], "seq_len": args.ndcg_seq_len, "rows_per_forward": rows,
        "reference_topk_seconds": ref_s, "reference_topk_tokens_per_s": ndcg["positions"] / ref_s,
        "ndcg_seconds": ndcg_s, "ndcg_tokens_per_s": ndcg["positions"] / ndcg_s, "ndcg_self": ndcg["ndcg@10"],
    }
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")
    versus = [mem.get(f"vs_generate_bs{batch_sizes[0]}", {})]
    versus += [v for v in mem.get(f"testbed_vs_generate_bs{batch_sizes[0]}", {}).values() if isinstance(v, dict)]
    differing = [k for vs in versus for k, v in vs.items() if isinstance(v, dict) and v.get("same_tokens_as_generate") is False]
    if differing:
        print(f"tokens differ from model.generate in: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
