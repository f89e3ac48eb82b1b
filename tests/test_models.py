import pytest
import torch

from kfac_edit.errors import UserError
from kfac_edit.models import find_projections, parse_layers, parse_modules_option, use_modules


def test_find_projections_olmo2(tiny_model):
    projs = find_projections(tiny_model, layers=[1], projections=["gate", "up", "down"])
    assert [p.name for p in projs] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert projs[0].shape == (24, 16) and projs[2].shape == (16, 24)


def test_gpt2_conv1d_is_seen_as_out_in():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=32, n_positions=16))
    up, down = find_projections(model, layers=[0], projections=["up", "down"])
    assert up.name == "transformer.h.0.mlp.c_fc" and up.shape == (32, 8) and up.transposed
    x = torch.randn(3, 8)
    # Conv1D computes x @ W_stored + b; our (out, in) view must give the same as a Linear.
    assert torch.allclose(up.module(x), x @ up.weight().T + up.module.bias, atol=1e-6)
    new = torch.zeros(32, 8)
    up.set_weight(new)
    assert torch.count_nonzero(up.module.weight) == 0
    with pytest.raises(UserError, match="gate"):
        find_projections(model, projections=["gate"])


def test_gpt_neox_projections():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=32)
    )
    names = [p.name for p in find_projections(model, projections=["up", "down"])]
    assert names == [f"gpt_neox.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("dense_h_to_4h", "dense_4h_to_h")]


def test_bad_layers_and_unknown_arch(tiny_model):
    with pytest.raises(UserError, match="layer 5 does not exist"):
        find_projections(tiny_model, layers=[5])
    assert parse_layers("20-22,25") == [20, 21, 22, 25]
    assert parse_layers("all") is None
    with pytest.raises(UserError):
        parse_layers("a-b")

    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))])

    with pytest.raises(UserError, match="--modules"):
        find_projections(Weird())
    weird = Weird()
    use_modules(weird, parse_modules_option("up=0,down=1"))
    projs = find_projections(weird, projections=["up", "down"])
    assert [p.name for p in projs] == ["blocks.0.0", "blocks.0.1"]


def test_public_api_exports_resolve():
    import kfac_edit

    import inspect

    for name in kfac_edit.__all__[1:]:
        obj = getattr(kfac_edit, name)
        assert inspect.isclass(obj) or inspect.isfunction(obj), f"{name} resolves to {obj!r}"
    import kfac_edit.evaluate  # the subpackage must not shadow the function export

    assert inspect.isfunction(kfac_edit.evaluate_model)


def test_dtype_auto_is_the_checkpoints_own(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kfac_edit.models import dtype_name, resolve_dtype

    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    for dtype in (torch.bfloat16, torch.float64):
        model.to(dtype).save_pretrained(tmp_path / dtype_name(dtype))
        assert resolve_dtype(tmp_path / dtype_name(dtype)) == dtype  # on CPU as well: no device-dependent default
    assert resolve_dtype(tmp_path / "bfloat16", "float32") == torch.float32
    assert dtype_name(resolve_dtype("unused", torch.float16)) == "float16"
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        resolve_dtype(tmp_path / "bfloat16", "fp8")
    with pytest.raises(UserError, match="cannot load model"):
        resolve_dtype(tmp_path / "missing")


def test_quantized_weights_are_refused_in_one_line():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

    net = Net()
    net.blocks[0].up.weight = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.int8), requires_grad=False)
    use_modules(net, {"up": "up", "down": "down"})
    with pytest.raises(UserError, match=r"^module blocks\.0\.up holds quantized weights \(int8\); kfac-edit edits"):
        find_projections(net, projections=["up", "down"])
    use_modules(net, {"down": "down"})
    assert len(find_projections(net, projections=["down"])) == 1
