"""LoRA on tiny random Llama/Qwen3: identity at init, merge, the whole-MLP probe, dropout placement, and PEFT
loading our adapter."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

from lora import (LINEAR, PRESETS, LoraError, adapter_config, adapter_disabled, add_lora, load_adapter, lora_modules,
                  merge, save_adapter, unmerge)
from model import load_model, rope_cos_sin

MODELS = ["tiny_llama", "tiny_qwen3"]


def tokens(seed=1, shape=(2, 24)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def randomize_B(model, seed=0):
    """B starts at zero; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))


@torch.no_grad()
def logits(model, idx):
    return model(idx)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("kw", [dict(targets=LINEAR), dict(targets=("mlp",), layers=[1], init="paper")])
def test_zero_B_leaves_model_unchanged(fixture, kw, request):
    m, idx = load_model(request.getfixturevalue(fixture)), tokens()
    before = logits(m, idx)
    add_lora(m, rank=4, **kw)
    assert all(bool((x.lora_A != 0).any()) and not x.lora_B.any() for x in lora_modules(m).values())
    assert max_diff(logits(m, idx), before) <= 1e-6


@pytest.mark.parametrize("fixture", MODELS)
def test_merge_unmerge_disable(fixture, request):
    m, idx = load_model(request.getfixturevalue(fixture)), tokens()
    a = m.args
    base_logits = logits(m, idx)
    n = add_lora(m, rank=4, targets=LINEAR, alpha=8)  # s = 2
    randomize_B(m)
    on = logits(m, idx)
    assert max_diff(on, base_logits) > 1e-2  # the adapter matters
    with adapter_disabled(m):
        assert max_diff(logits(m, idx), base_logits) <= 1e-6
    assert max_diff(logits(m, idx), on) == 0.0  # switched back on afterwards

    w0 = {k: x.base.weight.clone() for k, x in lora_modules(m).items()}
    merge(m)
    merge(m)  # a second merge must not add the update twice
    tol = 1e-5 * on.abs().max().item()  # fp32 rounding, relative to the logit scale
    assert max_diff(logits(m, idx), on) <= tol
    x = lora_modules(m)["model.layers.0.self_attn.q_proj"]
    assert max_diff(x.base.weight - w0["model.layers.0.self_attn.q_proj"], 2 * x.lora_B @ x.lora_A) <= 1e-6
    unmerge(m)
    assert max(max_diff(x.base.weight, w0[k]) for k, x in lora_modules(m).items()) <= 1e-6
    assert max_diff(logits(m, idx), on) <= tol

    # Σ over layers and targets of r·(d_in + d_out)
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    dims = [(a.dim, q), (a.dim, kv), (a.dim, kv), (q, a.dim),
            (a.dim, a.intermediate_size), (a.dim, a.intermediate_size), (a.intermediate_size, a.dim)]
    assert n == a.n_layers * sum(4 * (i + o) for i, o in dims)


def test_trainable_count_closed_form(tiny_qwen3):
    m = load_model(tiny_qwen3)
    a = m.args  # head_dim 32 != hidden/heads = 16, so q_proj is 64 -> 128
    assert add_lora(m, rank=3, targets=("q_proj", "v_proj")) == 3 * 3 * ((64 + 128) + (64 + 64))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 3 * 3 * (192 + 128)
    m = load_model(tiny_qwen3)
    assert add_lora(m, rank=5, targets=("mlp",), layers=[2], init="paper") == 2 * a.dim * 5


@pytest.mark.parametrize("fixture", MODELS)
def test_mlp_target_adds_xAB_to_the_block(fixture, request):
    m = load_model(request.getfixturevalue(fixture))
    add_lora(m, rank=4, targets=("mlp",), layers=[1], alpha=16, init="paper")  # the paper's s = 1, alpha ignored
    randomize_B(m)
    block, T = m.model.layers[1], 7
    h = torch.randn(2, T, m.args.dim, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_cos_sin(m.inv_freq, torch.arange(T), h.dtype)
    with torch.no_grad():
        got = block(h, cos, sin)
        h_mid = h + block.self_attn(block.input_layernorm(h), cos, sin)
        x = block.post_attention_layernorm(h_mid)  # the MLP input
        mlp = block.mlp.base
        A, B = block.mlp.lora_A, block.mlp.lora_B  # (r, D), (D, r)
        delta = x @ A.T @ B.T
        want = h_mid + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)) + delta
    assert A.shape == (4, m.args.dim) and B.shape == (m.args.dim, 4)
    assert delta.abs().max().item() > 1e-2
    assert max_diff(got, want) <= 1e-5


@pytest.mark.parametrize("fixture", MODELS)
def test_init_bounds(fixture, request):
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    m = load_model(path)
    add_lora(m, rank=16, targets=("mlp",), layers=[0, 2], alpha=64, init="paper")
    for x in lora_modules(m).values():
        bound = 1 / math.sqrt(16)  # their kaiming call took fan_in = r
        assert x.scale == 1.0 and not x.lora_B.any()
        assert x.lora_A.abs().max().item() <= bound and x.lora_A.abs().max().item() > 0.9 * bound
    m = load_model(path)
    add_lora(m, rank=16, targets=("q_proj", "down_proj"), alpha=64, init="standard")
    for x in lora_modules(m).values():
        bound = 1 / math.sqrt(x.lora_A.shape[1])  # PEFT: kaiming_uniform(a=√5) over fan_in = d_in
        assert x.scale == 4.0 and not x.lora_B.any()
        assert x.lora_A.abs().max().item() <= bound and x.lora_A.abs().max().item() > 0.9 * bound


def test_dropout_only_in_train_mode(tiny_llama):
    m, idx = load_model(tiny_llama), tokens()  # load_model returns the model in eval mode
    add_lora(m, rank=4, layers=[1], **{**PRESETS["paper"], "dropout": 0.5})
    randomize_B(m)
    first = logits(m, idx)
    assert max_diff(logits(m, idx), first) == 0.0  # adapters added to an eval model are in eval mode
    m.train()
    assert max_diff(logits(m, idx), first) > 1e-4
    m.eval()
    assert max_diff(logits(m, idx), first) == 0.0


def dropout_mask(shape, p, seed) -> torch.Tensor:
    """The 0/1 mask that dropout draws for `shape` as the first random op after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return (F.dropout(torch.ones(shape), p, training=True) > 0).float()


@pytest.mark.parametrize("preset", ["paper", "standard"])
def test_dropout_placement_closed_form(preset, tiny_llama):
    p, seed = 0.5, 7
    m = load_model(tiny_llama)
    add_lora(m, rank=4, targets=("v_proj",), layers=[0], alpha=8, dropout=p, init=PRESETS[preset]["init"])
    assert adapter_config(m)["dropout_at"] == PRESETS[preset]["dropout_at"]
    randomize_B(m)
    mod = lora_modules(m)["model.layers.0.self_attn.v_proj"]  # 64 -> 32, so a misplaced mask cannot fit
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    A, B = mod.lora_A.detach(), mod.lora_B.detach()
    s = 1.0 if preset == "paper" else 8 / 4  # the paper init forces s = 1; the standard one has alpha / r
    with torch.no_grad():
        base = mod.base(x)
        mod.train()
        torch.manual_seed(seed)  # the base is a plain linear: the adapter's dropout is the first random op
        got = mod(x)
        off = mod.eval()(x)
    if preset == "paper":  # the authors' h + drop(x·A·B)
        mask = dropout_mask((2, 5, 32), p, seed)
        want = base + s * ((x @ A.T @ B.T) * mask / (1 - p))
    else:  # PEFT's B(A(drop(x)))
        mask = dropout_mask((2, 5, 64), p, seed)
        want = base + s * (((x * mask) / (1 - p)) @ A.T @ B.T)
    assert mod.scale == s and 0.3 < mask.mean().item() < 0.7  # a real mask, neither all kept nor all dropped
    assert max_diff(got, want) <= 1e-5
    assert max_diff(off, base + s * (x @ A.T @ B.T)) <= 1e-5  # no dropout in eval mode
    assert max_diff(got, off) > 1e-2  # the mask mattered


# ----------------------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("layers,init,alpha,peft_alpha", [
    ([0, 2], "standard", 12, 12),  # s = 3, so the scale matters
    (None, "standard", 12, 12),
    ([0, 2], "paper", 16, 4),  # the paper init forces s = 1; alpha = 16 would make PEFT scale by 4
])
def test_peft_loads_our_adapter(fixture, layers, init, alpha, peft_alpha, request, tmp_path):
    peft = pytest.importorskip("peft")
    path, idx = request.getfixturevalue(fixture), tokens()
    m = load_model(path)
    add_lora(m, rank=4, targets=("q_proj", "v_proj"), layers=layers, alpha=alpha, init=init)
    randomize_B(m)
    ours = logits(m, idx)
    save_adapter(m, tmp_path / "adapter", dict(base_model=str(path)))

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == peft_alpha  # PEFT's alpha / r is our s
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == layers  # None means every layer
    assert cfg["base_model_name_or_path"] == str(path)

    ref = hf_model(path)
    with torch.no_grad():
        base = ref(idx).logits
        pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
        theirs = pm(idx).logits
    assert max_diff(theirs, base) > 1e-2  # PEFT really applied our weights
    assert max_diff(theirs, ours) <= 1e-4
    wrapped = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == 2 * len(layers or range(3))


@pytest.mark.parametrize("kw", [dict(targets=("q_proj", "v_proj"), layers=[0, 2], alpha=12),
                                dict(layers=[1], **PRESETS["paper"])])
def test_save_load_round_trip(kw, tiny_qwen3, tmp_path):
    idx = tokens()
    m = load_model(tiny_qwen3)
    add_lora(m, rank=4, **kw)
    randomize_B(m)
    want = logits(m, idx)
    save_adapter(m, tmp_path / "a")
    fresh = load_model(tiny_qwen3)
    cfg = load_adapter(fresh, tmp_path / "a")
    assert cfg == adapter_config(m) == adapter_config(fresh)
    assert cfg["targets"] == list(kw["targets"]) and cfg["layers"] == kw["layers"] and cfg["rank"] == 4
    assert torch.equal(logits(fresh, idx), want)
    is_mlp = "mlp" in kw["targets"]
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"adapter.json", "adapter.safetensors"} <= names
    assert ("adapter_model.safetensors" in names) == ("adapter_config.json" in names) == (not is_mlp)


@pytest.mark.parametrize("init,dropout_at", [("paper", "output"), ("standard", "input")])
def test_old_adapter_json_infers_dropout_at(init, dropout_at, tiny_llama, tmp_path):
    m = load_model(tiny_llama)
    add_lora(m, rank=4, layers=[1], init=init, dropout_at="input" if init == "paper" else "output")
    save_adapter(m, tmp_path / "a")
    meta = tmp_path / "a" / "adapter.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "dropout_at"}))
    fresh = load_model(tiny_llama)
    assert load_adapter(fresh, tmp_path / "a")["dropout_at"] == dropout_at  # from init, not the lost setting
    assert {x.dropout_at for x in lora_modules(fresh).values()} == {dropout_at}


def test_save_replaces_folder_atomically(tiny_llama, tmp_path):
    out = tmp_path / "adapter"
    m = load_model(tiny_llama)
    add_lora(m, rank=2, targets=("q_proj",))
    save_adapter(m, out)
    (out / "stale.txt").write_text("from an older run")
    assert (out / "adapter_model.safetensors").is_file()

    m = load_model(tiny_llama)
    add_lora(m, rank=4, layers=[2], **PRESETS["paper"])
    save_adapter(m, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no stale PEFT files
    assert json.loads((out / "adapter.json").read_text())["targets"] == ["mlp"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no .tmp/.old siblings left


# ----------------------------------------------------------------------------- bad settings


def test_errors(tiny_llama, tmp_path):
    m = load_model(tiny_llama)
    for r in (0, -1):
        with pytest.raises(LoraError, match=f"rank must be a positive integer, got {r}"):
            add_lora(m, rank=r)
    with pytest.raises(LoraError, match="unknown LoRA target 'qq_proj'; choose from q_proj"):
        add_lora(m, rank=4, targets=("qq_proj",))
    with pytest.raises(LoraError, match=r"layer 99 out of range: this model has layers 0\.\.2"):
        add_lora(m, rank=4, layers=[1, 99])
    with pytest.raises(LoraError, match="unknown init"):
        add_lora(m, rank=4, init="gaussian")
    with pytest.raises(LoraError, match="unknown dropout_at 'middle'; choose input or output"):
        add_lora(m, rank=4, dropout_at="middle")
    assert not lora_modules(m)  # failed calls leave the model untouched
    add_lora(m, rank=4, targets=("mlp",), layers=[1], init="paper")
    with pytest.raises(LoraError, match="already carries an adapter"):
        add_lora(m, rank=4)
    with pytest.raises(LoraError, match="cannot be merged"):
        merge(m)
    with pytest.raises(LoraError, match="no adapter in"):
        load_adapter(load_model(tiny_llama), tmp_path)
    mixed = load_model(tiny_llama)  # q_proj (linear, mergeable) next to the whole-MLP probe (not)
    add_lora(mixed, rank=4, targets=("q_proj", "mlp"), layers=[1])
    for mod in lora_modules(mixed).values():
        torch.nn.init.normal_(mod.lora_B)
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(LoraError, match="cannot be merged"):
        merge(mixed)
    assert all(torch.equal(before[k], v) for k, v in mixed.state_dict().items())  # nothing half-merged


def test_rank_is_checked_against_each_modules_width(tiny_llama):
    m = load_model(tiny_llama)
    width = min(m.model.layers[0].self_attn.v_proj.weight.shape)  # grouped-query attention: v_proj is narrow
    assert width < m.args.dim
    with pytest.raises(LoraError, match=rf"rank {width + 1} exceeds the width of the adapted modules \({width},"):
        add_lora(m, rank=width + 1, targets=("q_proj", "v_proj"))
    assert not lora_modules(m)
    add_lora(m, rank=width + 1, targets=("q_proj", "mlp"))  # both as wide as the model
    assert all(mod.rank == width + 1 for mod in lora_modules(m).values())
