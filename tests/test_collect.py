"""Factor collection: exactness against brute force, invariances, sampled labels, numerics and bad input."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from conftest import make_tiny_olmo2, random_number_texts

from kfac_edit.data import token_batches
from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.collector import (
    FactorCollector,
    add_gram,
    mirror_upper_,
    sample_labels,
    valid_positions,
    window_uniforms,
)
from kfac_edit.factors.memory import factor_nbytes
from kfac_edit.models import find_projections

TIGHT = 1e-12


def _full_precision_norm(self, hidden):
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def exact_model(layers: int = 2, seed: int = 0):
    """The fp64 tiny OLMo-2 with its RMSNorms computing in fp64 too.

    OLMo-2's RMSNorm computes in fp32 whatever the model dtype, which limits agreement between mathematically equal
    computations to ~1e-7 once gradients mix positions (attention); for 1e-10 checks every op must be fp64.
    """
    model = make_tiny_olmo2(layers=layers, seed=seed)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_full_precision_norm, module)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_factors(f1, f2, tol=TIGHT):
    assert f1.names == f2.names
    for name in f1.names:
        assert f1.tokens(name) == f2.tokens(name), name
        assert rel(f1.modules[name].activation_sum, f2.modules[name].activation_sum) < tol, name
        assert rel(f1.modules[name].grad_sum, f2.modules[name].grad_sum) < tol, name


def capture(model, projections, batch):
    """Forward with the collector's position ids; returns logits and each projection's (input, output)."""
    ins, outs, handles = {}, {}, []
    for p in projections:

        def hook(module, args, output, name=p.name):
            ins[name], outs[name] = args[0], output

        handles.append(p.module.register_forward_hook(hook))
    mask = batch["attention_mask"]
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
    for h in handles:
        h.remove()
    return logits, ins, outs


def token_gradients(model, batch, projections):
    """``(inputs, grads, positions)``: each projection's input and the gradient of the *summed* gold-label loss
    w.r.t. its output, built by a Python loop as the sum of single-token-loss gradients (one backward per token)."""
    logits, ins, outs = capture(model, projections, batch)
    ids = batch["input_ids"]
    positions = valid_positions(batch["attention_mask"]).nonzero().tolist()
    names = list(outs)
    summed = {n: torch.zeros_like(outs[n]) for n in names}
    for b, t in positions:
        token_loss = F.cross_entropy(logits[b, t], ids[b, t + 1])
        for n, g in zip(names, torch.autograd.grad(token_loss, [outs[n] for n in names], retain_graph=True)):
            summed[n] += g
    return ins, summed, positions


def brute_force(model, batch, projections):
    """A and G with gold labels by a Python loop (:func:`token_gradients`), explicit outer products per row."""
    ins, summed, positions = token_gradients(model, batch, projections)
    result = {}
    for n in summed:
        A = sum(torch.outer(ins[n][b, t].detach(), ins[n][b, t].detach()) for b, t in positions)
        G = sum(torch.outer(summed[n][b, t], summed[n][b, t]) for b, t in positions)
        result[n] = (A, G, len(positions))
    return result


def windows(n_docs=12, seq_len=9, seed=0, tokenizer=None):
    from kfac_edit.testbed import number_tokenizer

    tok = tokenizer or number_tokenizer(60)
    batches = list(token_batches(random_number_texts(n_docs, seed=seed), tok, seq_len, batch_size=1000))
    return torch.cat([b["input_ids"] for b in batches]), torch.cat([b["attention_mask"] for b in batches])


def batched(ids, mask, batch_size):
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, len(ids), batch_size)
    ]


# ------------------------------------------------------------------------------------------------ exactness
def test_matches_brute_force_gold_labels_with_left_and_right_padding():
    model = exact_model()
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    projections = find_projections(model)
    factors = collect_factors(model, [batch], labels="gold", progress=False)
    expected = brute_force(model, batch, projections)
    assert len(expected) == 6
    for name, (A, G, n) in expected.items():
        assert n == 6 + 3 + 4
        mf = factors.modules[name]
        assert mf.activation_tokens == mf.grad_tokens == n
        assert mf.activation_sum.dtype == torch.float64
        assert rel(mf.activation_sum, A) < 1e-10, name
        assert rel(mf.grad_sum, G) < 1e-10, name
    gate, up = factors.modules["model.layers.1.mlp.gate_proj"], factors.modules["model.layers.1.mlp.up_proj"]
    assert gate.activation_sum is up.activation_sum
    # weights untouched and left without gradients
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_gpt2_conv1d_matches_brute_force():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=32, n_positions=16, resid_pdrop=0.5, embd_pdrop=0.5)
    model = GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    factors = collect_factors(model, [batch], labels="gold", bias="keep", progress=False)  # kinds: up, down; A over a
    assert factors.names == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")]
    expected = brute_force(model, batch, find_projections(model, projections=["up", "down"]))
    for name, (A, G, n) in expected.items():
        assert factors.shape(name) == (G.shape[0], A.shape[0])
        assert rel(factors.modules[name].activation_sum, A) < 1e-10, name
        assert rel(factors.modules[name].grad_sum, G) < 1e-10, name
    assert factors.shape("transformer.h.0.mlp.c_fc") == (32, 8)


# ------------------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("labels", ["gold", "sampled"])
def test_batch_size_invariance(labels):
    model = exact_model()
    ids, mask = windows()
    assert len(ids) >= 8 and mask[-1].sum() < ids.shape[1]  # a padded last window is included
    one = collect_factors(model, batched(ids, mask, 1), labels=labels, progress=False)
    eight = collect_factors(model, batched(ids, mask, 8), labels=labels, progress=False)
    assert_same_factors(one, eight)
    assert one.manifest["tokens"] == int(mask.sum()) and one.manifest["windows"] == len(ids)


def test_padding_invariance():
    model = exact_model()
    ids, mask = windows(n_docs=6)
    n, T = ids.shape
    plain = collect_factors(model, batched(ids, mask, 4), labels="gold", progress=False)
    # Same windows inside longer rows: left-padded, right-padded, and whole rows of padding between them.
    pad = 62
    rows, masks = [], []
    for i in range(n):
        extra = 3 + i % 2
        left = i % 2 == 0
        row = torch.full((T + extra,), pad)
        row_mask = torch.zeros(T + extra, dtype=torch.long)
        sl = slice(extra, None) if left else slice(0, T)
        row[sl], row_mask[sl] = ids[i], mask[i]
        rows.append(row)
        masks.append(row_mask)
        rows.append(torch.full((T + extra,), pad))
        masks.append(torch.zeros(T + extra, dtype=torch.long))
    width = max(len(r) for r in rows)
    pid = torch.full((len(rows), width), pad)
    pmask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        if i % 4 == 0:  # push some rows further right: more left padding
            pid[i, width - len(r) :], pmask[i, width - len(r) :] = r, m
        else:
            pid[i, : len(r)], pmask[i, : len(r)] = r, m
    padded = collect_factors(model, batched(pid, pmask, 5), labels="gold", progress=False)
    assert_same_factors(plain, padded)
    assert plain.manifest["labelled_tokens"] == padded.manifest["labelled_tokens"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_invariance(reentrant):
    model = exact_model()
    ids, mask = windows(n_docs=6)
    batches = batched(ids, mask, 4)
    plain = collect_factors(model, batches, labels="sampled", seed=3, progress=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    checkpointed = collect_factors(model, batches, labels="sampled", seed=3, progress=False)
    handle.remove()
    assert len(calls) == 2 * len(batches)  # the MLP really was recomputed in backward
    assert_same_factors(plain, checkpointed)
    assert not model.model.layers[1].training  # training flags restored


def test_one_pass_equals_one_layer_at_a_time():
    model = exact_model(layers=3)
    ids, mask = windows(n_docs=6)
    batches = batched(ids, mask, 4)
    together = collect_factors(model, batches, labels="sampled", seed=1, progress=False)
    assert len(together) == 9
    for layer in range(3):
        alone = collect_factors(model, batches, layers=[layer], labels="sampled", seed=1, progress=False)
        for name in alone.names:
            assert rel(alone.modules[name].activation_sum, together.modules[name].activation_sum) < TIGHT
            assert rel(alone.modules[name].grad_sum, together.modules[name].grad_sum) < TIGHT
    only_down = collect_factors(model, batches, layers=[2], kinds=["down"], labels="sampled", seed=1, progress=False)
    name = "model.layers.2.mlp.down_proj"
    assert only_down.names == [name]
    assert rel(only_down.modules[name].grad_sum, together.modules[name].grad_sum) < TIGHT


# ------------------------------------------------------------------------------------------------ sampled labels
def test_sampled_labels_deterministic_under_seed():
    model = exact_model()
    ids, mask = windows(n_docs=6)
    batches = batched(ids, mask, 4)
    a = collect_factors(model, batches, labels="sampled", seed=7, progress=False)
    b = collect_factors(model, batches, labels="sampled", seed=7, progress=False)
    c = collect_factors(model, batches, labels="sampled", seed=8, progress=False)
    gold = collect_factors(model, batches, labels="gold", progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(a.modules[name].grad_sum, b.modules[name].grad_sum)
    assert rel(a.modules[name].grad_sum, c.modules[name].grad_sum) > 1e-3
    assert rel(a.modules[name].grad_sum, gold.modules[name].grad_sum) > 1e-3
    assert torch.equal(a.modules[name].activation_sum, c.modules[name].activation_sum)  # A ignores labels
    assert a.manifest["labels"] == "sampled" and a.manifest["seed"] == 7


def test_sample_labels_follows_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]], dtype=torch.float64)).expand(40000, 4)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = sample_labels(logits, u)
    freq = torch.bincount(y, minlength=4).double() / len(y)
    assert freq[1] == 0  # zero probability: never drawn
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64), atol=0.01)
    # uniforms depend on (seed, window index) only
    assert torch.equal(window_uniforms(1, [5, 9], 6)[1], window_uniforms(1, [9], 6)[0])
    assert not torch.equal(window_uniforms(1, [5], 6), window_uniforms(2, [5], 6))


def exact_fisher_G(model, ids, projections):
    """E_{y ~ p}[g gᵀ] summed over rows, by enumerating the vocabulary at every labelled position."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits, _, outs = capture(model, projections, batch)
    names = list(outs)
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.detach(), -1)
    G = {n: 0 for n in names}
    for t in range(ids.shape[1] - 1):
        for v in range(vocab):
            loss = F.cross_entropy(logits[0, t], torch.tensor(v))
            grads = torch.autograd.grad(loss, [outs[n] for n in names], retain_graph=True)
            for n, g in zip(names, grads):
                rows = g[0, : ids.shape[1] - 1]
                G[n] = G[n] + probs[0, t, v] * rows.T @ rows
    return G


def test_sampled_labels_average_to_exact_fisher():
    """Cross terms between positions vanish in expectation (E[p - e_y] = 0), so E[G] = Σ_t Σ_v p_t(v) g gᵀ."""
    model = exact_model(layers=1)
    ids = torch.tensor([[60, 3, 17, 42, 8]])
    projections = find_projections(model)
    exact = exact_fisher_G(model, ids, projections)
    draws, per_batch = 4096, 1024
    copies = ids.expand(per_batch, -1)
    batches = [
        {
            "input_ids": copies,
            "attention_mask": torch.ones_like(copies),
            "window_index": torch.arange(i, i + per_batch),
        }
        for i in range(0, draws, per_batch)
    ]
    sampled = collect_factors(model, batches, labels="sampled", seed=0, progress=False)
    gold = collect_factors(model, batches[:1], labels="gold", progress=False)
    for p in projections:
        mc = sampled.modules[p.name].grad_sum / draws
        err = rel(mc, exact[p.name])
        # Monte-Carlo error ~ 1/sqrt(draws); the empirical (gold) Fisher is far from the true one.
        assert err < 0.06, (p.name, err)
        assert rel(gold.modules[p.name].grad_sum / per_batch, exact[p.name]) > 4 * err, p.name


# ------------------------------------------------------------------------------------------------ numerics
def test_bf16_model_accumulates_in_fp32():
    model64 = make_tiny_olmo2(dtype=torch.float64)
    model16 = make_tiny_olmo2(dtype=torch.bfloat16)
    ids, mask = windows(n_docs=4)
    f64 = collect_factors(model64, batched(ids, mask, 4), labels="gold", progress=False)
    f16 = collect_factors(model16, batched(ids, mask, 4), labels="gold", progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert f16.modules[name].grad_sum.dtype == torch.float32
    assert f16.manifest["dtype"] == "bfloat16" and f16.manifest["accumulate_dtype"] == "float32"
    assert rel(f16.modules[name].activation_sum, f64.modules[name].activation_sum) < 0.05
    assert rel(f16.modules[name].grad_sum, f64.modules[name].grad_sum) < 0.1


def test_add_gram_casts_low_precision_rows():
    rows = torch.randn(50, 6, dtype=torch.float64).to(torch.bfloat16)
    total = torch.ones(6, 6)
    add_gram(total, rows)
    cast = rows.double()
    assert torch.allclose(total.double(), 1 + cast.T @ cast, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 40), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_upper_block_gram_mirrored_equals_full(d, n, seed):
    """Symmetric accumulation: upper block triangle only, mirrored on read, equals the full Gram (fp64), and mirroring
    again (after a checkpoint, before more updates) changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, d, dtype=torch.float64, generator=gen) for _ in range(3)]
    full, upper = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for i, rows in enumerate(batches):
        add_gram(full, rows)
        add_gram(upper, rows, upper=True)
        if i == 1:
            mirror_upper_(upper)  # a read in the middle (checkpoint, all-reduce) keeps later updates right
    mirror_upper_(upper)
    torch.testing.assert_close(upper, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upper, upper.T, rtol=0, atol=1e-12)
    again = upper.clone()
    mirror_upper_(again)
    assert torch.equal(again, upper)


def test_nan_in_factors_names_the_module():
    model = make_tiny_olmo2()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    ids, mask = windows(n_docs=2)
    with pytest.raises(UserError, match=r"model\.layers\.\d\.mlp\.\w+_proj\.\w+_sum contains NaN/Inf"):
        collect_factors(model, batched(ids, mask, 4), layers=[1], labels="gold", progress=False)


def test_bad_input():
    model = make_tiny_olmo2()
    ids = torch.randint(0, 60, (2, 5))
    with pytest.raises(UserError, match="no token with a label"):
        collect_factors(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], progress=False)
    with pytest.raises(UserError, match="label mode"):
        collect_factors(model, [], labels="empirical", progress=False)
    with pytest.raises(UserError, match="layer 5 does not exist"):
        collect_factors(model, [], layers=[5], progress=False)
    collector = FactorCollector(model, find_projections(model, layers=[0]))
    with pytest.raises(RuntimeError, match="context manager"):
        collector.accumulate({"input_ids": ids})


def test_max_tokens_resume_and_memory_plan():
    model = exact_model()
    ids, mask = windows(n_docs=12)
    batches = batched(ids, mask, 2)
    first = collect_factors(model, batches, labels="sampled", max_tokens=1, progress=False)
    assert first.manifest["windows"] == 2  # stops before the batch after the limit
    # Continue into the same sums from window 2 on: equals one uninterrupted run (sums and counts add up).
    projections = find_projections(model)
    with FactorCollector(model, projections, labels="sampled", factors=first, start_window=2) as collector:
        for batch in batches[1:]:
            collector.accumulate(batch)
    resumed = collector.finish()
    whole = collect_factors(model, batches, labels="sampled", progress=False)
    assert_same_factors(resumed, whole)
    assert resumed.manifest["tokens"] == whole.manifest["tokens"]
    sizes = factor_nbytes(projections, torch.float32)
    assert sizes["model.layers.0.mlp.gate_proj"] == 4 * (24 * 24 + 16 * 16)
    assert sizes["model.layers.0.mlp.up_proj"] == 4 * 24 * 24  # its activation sum is the gate's
    assert sum(sizes.values()) * 2 == whole.nbytes()  # fp64 sums here
