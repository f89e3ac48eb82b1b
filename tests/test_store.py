"""Factor store (sums + counts, safetensors + manifest) and import of the reference .pt format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_olmo2
from safetensors import safe_open

from kfac_edit.errors import UserError
from kfac_edit.factors.collect import collect_factors
from kfac_edit.factors.reference import import_reference
from kfac_edit.factors.store import MANIFEST_FILE, TENSORS_FILE, Factors, ModuleFactors

GATE, UP, DOWN = (f"model.layers.1.mlp.{k}_proj" for k in ("gate", "up", "down"))


@pytest.fixture(scope="module")
def collected():
    torch.manual_seed(0)
    model = make_tiny_olmo2(dtype=torch.float32)
    ids = torch.randint(0, 60, (4, 12))
    return collect_factors(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)


def test_save_load_round_trip(collected, tmp_path):
    collected.save(tmp_path / "f")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f" / TENSORS_FILE).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    loaded = Factors.load(tmp_path / "f")
    assert loaded.names == collected.names
    for name in collected.names:
        a, b = collected.modules[name], loaded.modules[name]
        assert torch.equal(a.activation_sum, b.activation_sum) and torch.equal(a.grad_sum, b.grad_sum)
        assert (a.activation_tokens, a.grad_tokens) == (b.activation_tokens, b.grad_tokens) == (44, 44)
        assert torch.allclose(loaded.grad_cov(name), a.grad_sum / 44)
        assert loaded.content_hash(name) == collected.content_hash(name)
    # gate/up share one activation tensor: stored once, shared again after loading
    with safe_open(str(tmp_path / "f" / TENSORS_FILE), "pt") as fh:
        keys = set(fh.keys())
    assert f"{GATE}.activation_sum" in keys and f"{UP}.activation_sum" not in keys and f"{UP}.grad_sum" in keys
    assert loaded.modules[GATE].activation_sum is loaded.modules[UP].activation_sum
    assert loaded.modules[UP].activation_key == GATE and loaded.modules[DOWN].activation_key == DOWN
    manifest = json.loads((tmp_path / "f" / MANIFEST_FILE).read_text())
    for field in ("model_fingerprint", "labels", "seed", "tokens", "dtype", "kfac_edit_version", "created", "run_id"):
        assert field in manifest, field
    assert manifest["labels"] == "sampled" and manifest["tokens"] == 48 and manifest["labelled_tokens"] == 44
    assert manifest["modules"][DOWN]["shape"] == [16, 24] and manifest["modules"][DOWN]["grad_tokens"] == 44
    assert manifest["format_version"] == 2 and manifest["modules"][UP]["activation_key"] == GATE
    # only some modules
    part = Factors.load(tmp_path / "f", names=[UP])
    assert part.names == [UP] and torch.equal(part.modules[UP].activation_sum, collected.modules[UP].activation_sum)


def test_version_1_directory_still_loads(tmp_path):
    """A factor directory written the old way (format 1: tensors ``*.activation_cov``/``*.grad_cov`` holding sums,
    named by ``activation_cov_key``/``grad_cov_key``; counts as ``*_tokens``), built by hand."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    square = (torch.randn(n, n, generator=gen) for n in (3, 2, 2))
    act, g_gate, g_up = (m @ m.T + torch.eye(len(m)) for m in square)  # sums of outer products: symmetric PSD
    tensors = {f"{GATE}.activation_cov": act, f"{GATE}.grad_cov": g_gate, f"{UP}.grad_cov": g_up}
    save_file(tensors, str(tmp_path / TENSORS_FILE), metadata={"run_id": "old"})
    entry = {"shape": [2, 3], "activation_tokens": 5, "grad_tokens": 5, "activation_cov_key": f"{GATE}.activation_cov"}
    modules = {GATE: {**entry, "grad_cov_key": f"{GATE}.grad_cov"}, UP: {**entry, "grad_cov_key": f"{UP}.grad_cov"}}
    manifest = {"format_version": 1, "run_id": "old", "labels": "sampled", "modules": modules}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    old = Factors.load(tmp_path)
    assert old.names == [GATE, UP] and old.modules[UP].activation_key == GATE
    assert old.modules[GATE].activation_sum is old.modules[UP].activation_sum
    assert torch.equal(old.activation_cov(UP), act / 5) and torch.equal(old.grad_cov(UP), g_up / 5) and old.tokens(UP) == 5
    assert Factors.load(tmp_path, names=[UP]).modules[UP].activation_key == GATE
    # saved again, it is a version 2 directory with the same sums
    again = Factors.load(old.save(tmp_path / "v2"))
    assert again.manifest["format_version"] == 2 and torch.equal(again.modules[UP].activation_sum, act)
    manifest["format_version"] = 9
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 9"):
        Factors.load(tmp_path)


def test_interrupted_or_missing_files_never_load(collected, tmp_path):
    with pytest.raises(UserError, match="holds no complete factors"):
        Factors.load(tmp_path)
    collected.save(tmp_path / "a")
    collected.save(tmp_path / "b")
    # a tensors file from another run beside this manifest (a save killed between the two renames)
    (tmp_path / "b" / TENSORS_FILE).replace(tmp_path / "a" / TENSORS_FILE)
    with pytest.raises(UserError, match="different runs"):
        Factors.load(tmp_path / "a")
    (tmp_path / "b" / MANIFEST_FILE).write_text("{not json")
    (tmp_path / "b" / TENSORS_FILE).write_bytes(b"")
    with pytest.raises(UserError, match="not valid JSON"):
        Factors.load(tmp_path / "b")
    with pytest.raises(UserError, match="no factors for module 'nope'"):
        collected.activation_cov("nope")


def test_add_sums_counts_and_keeps_sharing(collected):
    total = Factors().add_(collected)
    assert total.modules[GATE].activation_sum is total.modules[UP].activation_sum
    assert total.modules[GATE].activation_sum is not collected.modules[GATE].activation_sum
    total.add_(collected)
    for name in collected.names:
        assert torch.allclose(total.modules[name].activation_sum, 2 * collected.modules[name].activation_sum)
        assert torch.allclose(total.modules[name].grad_sum, 2 * collected.modules[name].grad_sum)
        assert total.tokens(name) == 88
        assert torch.allclose(total.grad_cov(name), collected.grad_cov(name))  # mean unchanged
    bad = Factors({GATE: ModuleFactors(torch.zeros(3, 3), torch.zeros(3, 3), 1, 1)})
    with pytest.raises(UserError, match="shapes"):
        total.add_(bad)
    assert len(total.tensors()) == 6 * 2 - 2  # two shared activation sums
    assert total.nbytes() == sum(t.numel() * 4 for t in total.tensors())
    moved = total.to(dtype=torch.float64)
    assert moved.modules[GATE].activation_sum is moved.modules[UP].activation_sum
    assert moved.modules[GATE].activation_sum.dtype == torch.float64


def test_from_means_shares_identical_activation_and_check_finite():
    A, G = torch.eye(3), torch.ones(2, 2)
    f = Factors.from_means({"g": (A, G, 4), "u": (A, G * 2, 4), "d": (A.clone(), G, 4)})
    assert f.modules["g"].activation_sum is f.modules["u"].activation_sum
    assert f.modules["d"].activation_sum is not f.modules["g"].activation_sum
    assert torch.equal(f.activation_cov("u"), A) and torch.equal(f.grad_cov("u"), 2 * G) and f.tokens("u") == 4
    h = f.content_hash("u")
    f.modules["u"].grad_sum[0, 0] = float("inf")
    f._hashes.clear()
    assert f.content_hash("u") != h
    with pytest.raises(UserError, match="u.grad_sum contains NaN/Inf"):
        f.check_finite()


# ------------------------------------------------------------------------------------------------ reference import
def reference_dict(shared: str = "same-object"):
    torch.manual_seed(0)
    out = {}
    for i in (0, 1):
        A = torch.randn(16, 16)
        A = A @ A.T
        gate_A = A if shared == "same-object" else A.clone()
        out[f"blk{i}.gate"] = {"A": gate_A, "G": torch.eye(24) * (i + 1), "n_tokens": 1000}
        out[f"blk{i}.up"] = {"A": A, "G": torch.eye(24) * 3, "n_tokens": torch.tensor(1000)}
        out[f"blk{i}.down"] = {"A": torch.eye(24) * 2, "G": torch.eye(16), "n_tokens": 1000}
    return out


@pytest.mark.parametrize("shared", ["same-object", "equal-values"])
def test_import_reference(tmp_path, shared):
    ref = reference_dict(shared)
    torch.save(ref, tmp_path / "old.pt")
    factors = import_reference(tmp_path / "old.pt")
    assert factors.names == [f"model.layers.{i}.mlp.{k}_proj" for i in (0, 1) for k in ("gate", "up", "down")]
    assert torch.allclose(factors.activation_cov("model.layers.1.mlp.up_proj"), ref["blk1.up"]["A"], rtol=1e-6)
    assert torch.allclose(factors.grad_cov("model.layers.1.mlp.gate_proj"), ref["blk1.gate"]["G"])
    assert factors.tokens("model.layers.0.mlp.down_proj") == 1000
    gate, up = factors.modules["model.layers.0.mlp.gate_proj"], factors.modules["model.layers.0.mlp.up_proj"]
    assert gate.activation_sum is up.activation_sum
    factors.save(tmp_path / "out")
    assert len(Factors.load(tmp_path / "out").tensors()) == 10


def test_import_reference_by_model_and_bad_files(tmp_path, tiny_model):
    ref = reference_dict()
    torch.save(ref, tmp_path / "old.pt")
    named = import_reference(tmp_path / "old.pt", name_template="layers.{i}.{proj}")
    assert named.names[0] == "layers.0.gate"
    by_model = import_reference(tmp_path / "old.pt", model=tiny_model)
    assert by_model.names[0] == "model.layers.0.mlp.gate_proj"
    assert by_model.manifest["model_fingerprint"]
    ref["blk1.down"]["A"] = torch.eye(5)
    torch.save(ref, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"blk1\.down.*right --model"):
        import_reference(tmp_path / "wrong.pt", model=tiny_model)
    with pytest.raises(UserError, match="needs \\{i\\}"):
        import_reference(tmp_path / "old.pt", name_template="model.mlp")
    torch.save({"block1.gate": {}}, tmp_path / "badkey.pt")
    with pytest.raises(UserError, match="not of the form"):
        import_reference(tmp_path / "badkey.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        import_reference(tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="does not exist"):
        import_reference(tmp_path / "missing.pt")
