"""Model-level edit: spec parsing, apply/restore, the eigen cache, saved directories and the CLI's bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_olmo2

from kfac_edit.cli import main
from kfac_edit.curvature import edit_weight, eigendecompose, pair_mass_fraction, project_weight
from kfac_edit.curvature import select_pairs as select_pairs_counts
from kfac_edit.curvature import select_pairs_mask as select_pairs  # the tests below read a bool mask
from kfac_edit.constants import EDIT_REPORT_FILE
from kfac_edit.edit import ORIGINALS_ATTR, apply_edit, restore, save_edited
from kfac_edit.eigen import EigenCache, default_cache_dir
from kfac_edit.spec import EditSpec, LabelMode, Method
from kfac_edit.errors import UserError
from kfac_edit.factors.store import Factors
from kfac_edit.models import find_projections, projection_kinds

SPEC = '{"1": {"gate": 0.5, "up": 0.6}, "0": {"down": 0.3, "up": 0.99995}}'
EDITED = {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"}


def random_spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64) / torch.arange(1, 3 * n + 1) ** 0.5
    return x @ x.T / (3 * n)


def make_factors(model, dtype=torch.float64, blocks=None) -> Factors:
    """Random SPD factors for every projection; gate and up of a block share one activation covariance."""
    means = {}
    shared = {}
    for p in find_projections(model, layers=blocks, projections=projection_kinds(model)):
        out_dim, in_dim = p.shape
        if p.kind in ("gate", "up"):
            act = shared.setdefault(p.block, random_spd(in_dim, seed=p.block).to(dtype))
        else:
            act = random_spd(in_dim, seed=50 + p.block).to(dtype)
        grad = random_spd(out_dim, seed=100 + 7 * p.block + len(p.kind)).to(dtype)
        means[p.name] = (act, grad, 1000)
    return Factors.from_means(means, manifest={"model": "tiny-olmo2", "labels": "sampled"})


# --------------------------------------------------------------------------------------------------- EditSpec


def test_spec_parses_reference_format():
    spec = EditSpec.from_json(SPEC)
    assert spec.keep_mass == {(1, "gate"): 0.5, (1, "up"): 0.6, (0, "down"): 0.3}  # 0.99995 is not edited
    assert spec.method == "kfac" and spec.blocks == [0, 1]
    assert json.loads(spec.to_json()) == {"0": {"down": 0.3}, "1": {"gate": 0.5, "up": 0.6}}
    again = EditSpec.from_json(spec.to_dict())
    assert again == spec
    assert EditSpec.from_json({"layers": {"3": {"up": 0.2}}, "method": "svd", "seed": 4}).method == "svd"
    assert EditSpec.from_json({"layers": {"3": {"up": 0.2}}, "method": "svd"}, method="random").method == "random"
    assert EditSpec.from_json('{"2": {"up": 1}}').keep_mass == {}


def test_spec_from_file(tmp_path):
    path = tmp_path / "layers.json"
    path.write_text('{"23": {"gate": 0.6}}')
    assert EditSpec.from_file(path, method="kfac-independent").keep_mass == {(23, "gate"): 0.6}
    with pytest.raises(UserError, match="cannot read"):
        EditSpec.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"23": {"gate": 0.6,}}', "line 1, column 21"),
        ('{\n "23": {"gate": 0.6\n}', "line 3, column 2"),
        ('{"23": {"gate": 1.2}}', "outside \\[0, 1\\]"),
        ('{"23": {"gate": -0.1}}', "outside \\[0, 1\\]"),
        ('{"23": {"ffn": 0.5}}', "unknown projection 'ffn'"),
        ('{"x": {"gate": 0.5}}', "not a block index"),
        ('{"23": 0.5}', "must map projections"),
        ('{"23": {"gate": "0.5"}}', "must be a number"),
        ("[1, 2]", "object of blocks"),
    ],
)
def test_spec_bad_input(text, message):
    with pytest.raises(UserError, match=message):
        EditSpec.from_json(text)


def test_spec_unknown_method():
    with pytest.raises(UserError, match="unknown edit method 'magic'"):
        EditSpec.from_json('{"1": {"up": 0.5}}', method="magic")


def test_method_and_label_mode_enums():
    assert [m.value for m in Method] == ["kfac", "kfac-independent", "svd", "random", "ekfac", "bsn"]
    assert [m.needs_factors for m in Method] == [True, True, False, True, True, False]
    assert [m.value for m in LabelMode] == ["sampled", "gold"]
    with pytest.raises(UserError, match="unknown label mode 'true'; use one of sampled, gold"):
        LabelMode.parse("true", "label mode")
    spec = EditSpec({(1, "up"): 0.5}, method="svd")
    assert spec.method is Method.SVD and not spec.needs_factors and f"{spec.method}" == "svd"
    assert json.loads(json.dumps(spec.to_dict())) == {"method": "svd", "seed": 0, "layers": {"1": {"up": 0.5}}}
    with pytest.raises(UserError, match="block '-1' is not a block index"):
        EditSpec({(-1, "up"): 0.5})


# --------------------------------------------------------------------------------------------------- apply / restore


def is_edited(model) -> bool:
    """Whether ``model`` holds originals to restore (the attribute apply_edit keeps them in)."""
    return bool(getattr(model, ORIGINALS_ATTR, None))


def test_apply_edit_matches_edit_weight_and_restores_exactly():
    model = make_tiny_olmo2()
    factors = make_factors(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = EditSpec.from_json(SPEC)
    report = apply_edit(model, factors, spec)
    assert is_edited(model)
    assert {m.name for m in report.modules} == EDITED
    projections = {p.name: p for p in find_projections(model)}
    for m in report.modules:
        key = f"{m.name}.weight"
        expected = edit_weight(before[key], factors.activation_cov(m.name), factors.grad_cov(m.name), m.keep_mass)
        assert torch.allclose(projections[m.name].weight(), expected, atol=1e-12)
        grad = eigendecompose(factors.grad_cov(m.name)).values
        act = eigendecompose(factors.activation_cov(m.name)).values
        mask = select_pairs(grad, act, m.keep_mass)
        assert m.mass_fraction == pytest.approx(pair_mass_fraction(grad, act, mask), rel=1e-12)
        assert m.mass_fraction >= m.keep_mass
        assert m.pairs_kept == int(mask.sum()) and m.pairs_total == mask.numel()
        assert m.pairs_fraction == pytest.approx(m.pairs_kept / m.pairs_total)
        assert m.grad_vectors_used == int(mask.any(1).sum()) and m.act_vectors_used == int(mask.any(0).sum())
        change = (projections[m.name].weight().detach() - before[key]).norm() / before[key].norm()
        assert m.weight_change == pytest.approx(float(change), rel=1e-9)
    for key, value in model.state_dict().items():
        edited = key.removesuffix(".weight") in EDITED
        assert torch.equal(value, before[key]) != edited, key
    assert report.factor_manifest["model"] == "tiny-olmo2"
    assert report.eigen_cache["computed"] == 3
    assert sorted(restore(model)) == sorted(EDITED)
    assert not is_edited(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_edits_do_not_compound_and_failures_leave_model_untouched():
    model = make_tiny_olmo2()
    factors = make_factors(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = EigenCache(None)
    apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.4}}'), cache=cache)
    once = model.model.layers[0].mlp.up_proj.weight.clone()
    report = apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.4}}'), cache=cache)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, once)
    assert report.eigen_cache["memory_hits"] == 1 and report.eigen_cache["computed"] == 1
    apply_edit(model, factors, EditSpec.from_json('{"1": {"down": 0.4}}'), cache=cache)  # earlier edit undone
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    # NaN in the second module's factors: the first module's edit is rolled back
    bad = make_factors(model)
    bad.modules["model.layers.1.mlp.down_proj"].grad_sum[0, 0] = float("nan")
    with pytest.raises(UserError, match="model.layers.1.mlp.down_proj"):
        apply_edit(model, bad, EditSpec.from_json('{"0": {"down": 0.5}, "1": {"down": 0.5}}'))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_half_products_follow_the_weight_and_stay_bounded():
    model = make_tiny_olmo2()
    factors = make_factors(model)
    name, other = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    weight = model.get_submodule(name).weight.detach()
    cache = EigenCache(None)
    halves = cache.half_products(factors, name, weight)
    assert cache.half_products(factors, name, weight.clone()) is halves  # the same bytes: the same entry
    changed = weight.clone()
    changed[3, 5] += 1e-9
    assert cache.half_products(factors, name, changed) is not halves  # W changed: fresh half-products
    assert EigenCache(None, projection_bytes=0).half_products(factors, name, weight) is None  # opt-out
    small = EigenCache(None, projection_bytes=1)
    grad_eig, act_eig = small.get(factors, name)
    first = small.half_products(factors, name, weight)
    project_weight(weight, grad_eig, act_eig, select_pairs_counts(grad_eig.values, act_eig.values, 0.9), halves=first)
    assert first.nbytes > 1
    small.half_products(factors, other, model.get_submodule(other).weight.detach())  # over the bound: first dropped
    assert small.half_products(factors, name, weight) is not first


def test_sweep_through_one_cache_equals_fresh_edits():
    """keep_mass up and down with one EigenCache (half-products kept and grown) gives the weights of fresh edits."""
    model = make_tiny_olmo2()
    factors = make_factors(model)
    cache = EigenCache(None)
    modules = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    for keep in (0.5, 0.95, 0.3, 0.8):
        spec = EditSpec.from_json({"1": {"gate": keep, "up": keep}})
        apply_edit(model, factors, spec, cache=cache)
        swept = [model.get_submodule(m).weight.detach().clone() for m in modules]
        apply_edit(model, factors, spec, cache=EigenCache(None))
        for m, w in zip(modules, swept):
            assert float((model.get_submodule(m).weight.detach() - w).abs().max()) < 1e-12, (keep, m)
    restore(model)
    assert len(cache._halves) == 2 and all(h.nbytes > 0 for _, h in cache._halves.values())


def test_apply_edit_bad_factors_and_blocks():
    model = make_tiny_olmo2()
    partial = make_factors(model, blocks=[0])
    with pytest.raises(UserError, match=r"no factors for model.layers.1.mlp.up_proj .*cover blocks \[0\]"):
        apply_edit(model, partial, EditSpec.from_json('{"1": {"up": 0.5}}'))
    other = make_tiny_olmo2(layers=2)
    other_means = {}
    for p in find_projections(other):
        out_dim, in_dim = p.shape
        other_means[p.name] = (random_spd(in_dim + 4, seed=1), random_spd(out_dim, seed=2), 10)
    wrong = Factors.from_means(other_means)
    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj.*24x20 .*24x16.*another model"):
        apply_edit(model, wrong, EditSpec.from_json('{"0": {"up": 0.5}}'))
    with pytest.raises(UserError, match="block 5 does not exist"):
        apply_edit(model, make_factors(model), EditSpec.from_json('{"5": {"up": 0.5}}'))
    with pytest.raises(UserError, match="needs K-FAC factors"):
        apply_edit(model, None, EditSpec.from_json('{"0": {"up": 0.5}}'))
    assert not is_edited(model)


def test_baseline_methods():
    model = make_tiny_olmo2()
    factors = make_factors(model)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    svd = apply_edit(model, None, EditSpec.from_json('{"0": {"up": 0.7}}', method="svd")).modules[0]
    s = torch.linalg.svdvals(w) ** 2
    rank = int((torch.cumsum(s, 0) < 0.7 * s.sum()).sum()) + 1
    assert svd.pairs_kept == rank and svd.pairs_total == 16
    assert svd.mass_fraction == pytest.approx(float(s[:rank].sum() / s.sum()))
    assert int(torch.linalg.matrix_rank(model.model.layers[0].mlp.up_proj.weight)) == rank
    kfac = apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.7}}')).modules[0]
    rnd = apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.7}}', method="random")).modules[0]
    assert rnd.pairs_kept == kfac.pairs_kept and rnd.mass_fraction is None
    ind = apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.7}}', method="kfac-independent")).modules[0]
    assert ind.pairs_kept == ind.grad_vectors_used * ind.act_vectors_used
    assert 0.49 <= ind.mass_fraction <= 1.0  # about keep_mass², at least keep_mass² by construction
    restore(model)


def test_gpt2_conv1d_and_missing_kind():
    """GPT-2 stores (in, out) Conv1D weights: the edit still speaks (out, in) and restores exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)).double()
    factors = make_factors(model)
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (in, out) = (8, 32)
    report = apply_edit(model, factors, EditSpec.from_json('{"0": {"up": 0.5}}'))
    name = "transformer.h.0.mlp.c_fc"
    assert report.modules[0].name == name and report.modules[0].shape == (32, 8)
    expected = edit_weight(before.T, factors.activation_cov(name), factors.grad_cov(name), 0.5)
    assert torch.allclose(model.transformer.h[0].mlp.c_fc.weight.T, expected, atol=1e-12)
    restore(model)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    with pytest.raises(UserError, match="projection 'gate' does not exist in a gpt2 model"):
        apply_edit(model, factors, EditSpec.from_json('{"0": {"gate": 0.5}}'))


def test_eigen_cache_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("KFAC_EDIT_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "eigen"
    model = make_tiny_olmo2()
    factors = make_factors(model)
    spec = EditSpec.from_json('{"0": {"gate": 0.5, "up": 0.5}}')
    first = EigenCache.default()
    apply_edit(model, factors, spec, cache=first)
    files = sorted((tmp_path / "root" / "eigen").glob("*.safetensors"))
    assert len(files) == 2 and first.stats.computed == 2
    edited = model.model.layers[0].mlp.gate_proj.weight.clone()
    second = EigenCache(tmp_path / "root" / "eigen")  # a fresh process: reads the disk entries, computes nothing
    apply_edit(model, factors, spec, cache=second)
    assert second.stats.disk_hits == 2 and second.stats.computed == 0
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, edited)
    restore(model)


# --------------------------------------------------------------------------------------------------- save + CLI


def test_save_edited_loads_and_differs_only_in_edited_modules(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny_olmo2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_edit(model, make_factors(model), EditSpec.from_json(SPEC))
    out = save_edited(model, tiny_tokenizer, tmp_path / "edited", report)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    for key, value in loaded.state_dict().items():
        same = torch.equal(value, original[key])
        assert same != (key.removesuffix(".weight") in EDITED), key
    written = json.loads((out / "edit_report.json").read_text())
    assert {m["name"] for m in written["modules"]} == EDITED
    assert written["spec"]["layers"] == {"0": {"down": 0.3}, "1": {"gate": 0.5, "up": 0.6}}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an edited model directory"):
        save_edited(model, tiny_tokenizer, tmp_path / "other", report)
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


@pytest.fixture
def factors_dir(tmp_path):
    """Factors of the fp32 tiny model in tiny_model_dir (same seed and shapes), saved as `collect` would."""
    path = tmp_path / "factors"
    make_factors(make_tiny_olmo2(dtype=torch.float32), dtype=torch.float32).save(path)
    return path


def test_cli_edit_writes_a_model_directory(tmp_path, tiny_model_dir, factors_dir, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "edited"
    layers = tmp_path / "layers.json"
    layers.write_text(SPEC)
    argv = ["edit", "--model", str(tiny_model_dir), "--factors", str(factors_dir), "--layers-file", str(layers)]
    argv += ["--out", str(out), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert "model.layers.1.mlp.gate_proj: kfac keep 0.5" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    edited = AutoModelForCausalLM.from_pretrained(out)
    assert edited.dtype == torch.float32
    reference = original.state_dict()
    for key, value in edited.state_dict().items():
        assert torch.equal(value, reference[key]) != (key.removesuffix(".weight") in EDITED), key
    factors = Factors.load(factors_dir)
    name = "model.layers.1.mlp.up_proj"
    expected = edit_weight(reference[f"{name}.weight"], factors.activation_cov(name), factors.grad_cov(name), 0.6)
    assert torch.allclose(edited.state_dict()[f"{name}.weight"], expected, atol=1e-6)
    report = json.loads((out / "edit_report.json").read_text())
    assert report["factor_manifest"]["model"] == "tiny-olmo2" and report["eigen_cache"]["computed"] == 3
    assert (out / "tokenizer.json").exists()
    # a second run over the same output replaces it, reading eigendecompositions from the cache
    assert main(argv[:-4] + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--method", "svd"]) == 0
    report = json.loads((out / "edit_report.json").read_text())
    assert report["method"] == "svd"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers-json", '{"1": {"up": 0.5'], "malformed at line 1, column 17"),
        (["--layers-json", '{"1": {"up": 1.5}}'], "outside [0, 1]"),
        (["--layers-json", '{"1": {"mlp": 0.5}}'], "unknown projection 'mlp'"),
        (["--layers-json", '{"1": {"up": 1.0}}'], "edits nothing"),
        (["--layers-json", '{"7": {"up": 0.5}}'], "block 7 does not exist"),
        (["--layers-file", "/nonexistent/layers.json"], "cannot read the layers file"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, factors_dir, capsys, extra, message):
    out = tmp_path / "edited"
    argv = ["edit", "--model", str(tiny_model_dir), "--factors", str(factors_dir), "--out", str(out)]
    argv += ["--device", "cpu", "--cache-dir", str(tmp_path / "cache")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines may be transformers' loading progress bar
    assert last.startswith("kfac-edit: error: ") and message in last and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cli_factors_of_another_model_or_missing(tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "other-factors"
    wrong = {}
    for p in find_projections(make_tiny_olmo2(dtype=torch.float32)):
        out_dim, in_dim = p.shape
        wrong[p.name] = (torch.eye(in_dim), torch.eye(out_dim + 2), 5)
    Factors.from_means(wrong).save(other)
    partial = tmp_path / "partial-factors"
    make_factors(make_tiny_olmo2(dtype=torch.float32), dtype=torch.float32, blocks=[0]).save(partial)
    out = tmp_path / "edited"
    base = ["edit", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"]
    base += ["--cache-dir", str(tmp_path / "cache"), "--layers-json", '{"1": {"up": 0.5}}']
    assert main(base + ["--factors", str(other)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj" in err and "26x16" in err and "24x16" in err and "another model" in err
    assert main(base + ["--factors", str(partial)]) == 2
    assert "model.layers.1.mlp.up_proj" in capsys.readouterr().err
    assert main(base + ["--factors", str(tmp_path / "nowhere")]) == 2
    assert main(base) == 2  # kfac needs --factors
    assert "--factors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse rejects an unknown --method
        main(["edit", "--model", str(tiny_model_dir), "--out", str(out), "--layers-json", "{}", "--method", "x"])
    assert exc.value.code == 2
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cli_edit_under_torchrun_spreads_eigendecompositions(tmp_path, tiny_model_dir, factors_dir):
    """`kfac-edit edit` on 2 gloo ranks: each rank decomposes its share (gate/up of a block together), the shares
    are broadcast, rank 0 alone writes the directory, and the weights equal a one-process edit's."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    argv = ["edit", "--model", str(tiny_model_dir), "--factors", str(factors_dir), "--layers-json", SPEC,
            "--device", "cpu"]  # fmt: skip
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kfac_edit.cli",
           *argv, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache2")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert main([*argv, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1")]) == 0
    report = json.loads((tmp_path / "two" / EDIT_REPORT_FILE).read_text())
    assert 0 < report["eigen_cache"]["computed"] < 3  # rank 0 computed its share only ...
    assert report["eigen_cache"]["memory_hits"] == 3  # ... and edited every module from its filled cache
    assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == 3  # both ranks wrote their entries
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind
