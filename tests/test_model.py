"""Our hand-written forward pass and decoder against transformers on tiny random checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_model

from eval import generate
from model import ModelError, load_model, swiglu, swiglu_reference


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3", "tiny_sharded"])
def test_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref = load_model(path), hf_model(path)
    idx = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
    got = ours(idx)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_sharded_checkpoint_really_has_shards(tiny_sharded):
    index = json.loads((tiny_sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_configs_cover_rope_scaling_and_head_dim(tiny_llama, tiny_qwen3):
    a = load_model(tiny_llama).args
    assert a.rope_scaling and a.rope_scaling.get("rope_type", a.rope_scaling.get("type")) == "llama3"
    assert not a.tie_embeddings
    q = load_model(tiny_qwen3)
    assert q.args.tie_embeddings and q.args.head_dim * q.args.n_heads != q.args.dim
    assert q.lm_head.weight is q.model.embed_tokens.weight


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_generate_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref = load_model(path), hf_model(path)
    prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, min_new_tokens=40,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, 40) == want


def test_kv_cache_equals_full_forward_every_step(tiny_qwen3):
    m = load_model(tiny_qwen3)
    seq = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    full = m(seq)
    cache = m.new_cache(1, 30)
    step = m(seq[:, :10], pos0=0, cache=cache)  # prefill
    assert (step - full[:, :10]).abs().max() <= 1e-4
    step = m(seq[:, 10:14], pos0=10, cache=cache)  # a chunk after a prefix
    assert (step - full[:, 10:14]).abs().max() <= 1e-4
    for t in range(14, 30):
        step = m(seq[:, t : t + 1], pos0=t, cache=cache)
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-4


def test_generate_stops_at_eos(tiny_llama):
    m = load_model(tiny_llama)
    prompt = [5, 6, 7, 8]
    free = generate(m, prompt, 10)
    eos = free[3]
    stopped = generate(m, prompt, 10, eos_id=eos)
    assert stopped == free[: free.index(eos) + 1]


def test_run_layers_from_middle_equals_full(tiny_llama):
    m = load_model(tiny_llama)
    idx = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    h = m.run_layers(m.embed(idx), stop=2)
    assert torch.allclose(m.head(m.run_layers(h, start=2)), m(idx), atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _cli(*args):
    r = subprocess.run([sys.executable, str(ROOT / "model.py"), *args], capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stderr.strip()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_equal_autograd(dtype):
    """The memory-lean swiglu gives the plain swiglu_reference's output and gradients, bit for bit, and keeps two
    tensors for backward, not three."""
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 7, 40, generator=g).to(dtype) for _ in range(3))
    a = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    b = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y_ours = swiglu(*a)
    y_ref = swiglu_reference(*b)
    y_ours.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y_ours, y_ref)
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)
    assert len(saved) == 2


@pytest.mark.slow
def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope")
    code, err = _cli(str(tmp_path / "nope"))
    assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1 and "not found" in err


@pytest.mark.slow
def test_missing_and_corrupt_weights(tmp_path, tiny_llama):
    d = _copy(tiny_llama, tmp_path / "m")
    (d / "model.safetensors").unlink()
    code, err = _cli(str(d))
    assert code != 0 and "Traceback" not in err and "no model.safetensors" in err
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, err = _cli(str(d))
    assert code != 0 and "Traceback" not in err and "corrupt" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_wrong_shape_and_unsupported_type(tmp_path, tiny_llama):
    d = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    code, err = _cli(str(d))
    assert code != 0 and "Traceback" not in err and "shape" in err and "gate_proj" in err
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    code, err = _cli(str(d))
    assert code != 0 and "Traceback" not in err and "unsupported model_type 'gpt2'" in err


@pytest.mark.slow
def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", "nonexistent-org/nonexistent-model-xyz",
                        "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT)
    err = r.stderr.strip()
    assert r.returncode != 0 and "Traceback" not in err and "hub" in err and len(err.splitlines()) == 1


def test_load_model_takes_a_folder_and_says_how_to_resolve_names():
    with pytest.raises(ModelError, match="resolve_model_dir"):
        load_model("default")


def _loss_and_grads(model, ids: torch.Tensor, chunk: int | None = 512):
    """Mean next-token loss over a random batch, its argmax and the gradients of every weight of layer 1."""
    weights = list(model.model.layers[1].parameters())
    for p in weights:
        p.requires_grad_(True)
    h = model.run_layers(model.embed(ids[:, :-1]))               # (B, T-1, D)
    loss, pred = model.token_losses(h.flatten(0, 1), ids[:, 1:].flatten(), chunk)
    loss.mean().backward()
    return loss.detach(), pred, [p.grad for p in weights]


def test_fast_paths_equal_the_plain_ones(tiny_llama):
    """Activation checkpointing and the chunked loss give the plain path's losses, argmax and gradients."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    plain = _loss_and_grads(load_model(tiny_llama), ids, chunk=None)
    for kw, chunk in ((dict(checkpoint_layers=True), None), ({}, 7), (dict(checkpoint_layers=True), 7)):
        fast = _loss_and_grads(load_model(tiny_llama, **kw), ids, chunk)
        assert torch.allclose(fast[0], plain[0], atol=1e-5) and torch.equal(fast[1], plain[1])
        for a, b in zip(fast[2], plain[2], strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert any(float(g.abs().max()) > 0 for g in fast[2])
