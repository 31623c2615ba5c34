"""The GPU path, on a CUDA device against transformers on the same device: bf16 logits, greedy decoding
against `generate`, and FSDP2 over nccl. Skipped where no CUDA device exists (CI); tests/test_bf16.py holds
the CPU checks of the same bf16 path.

    python -m pytest -q tests/test_cuda.py          # on a GPU machine
"""

import os
import socket

import pytest
import torch

from eval import decode_batch, generate
from model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = ["tiny_llama", "tiny_qwen3"]  # llama3 rope scaling; Qwen3 with head_dim != hidden / heads


def ours(path, dtype="bf16"):
    return load_model(path, dtype=dtype, device=torch.device("cuda"))


def hf(path, dtype=torch.bfloat16):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("fixture", MODELS)
def test_cuda_bf16_logits_match_transformers(fixture, request):
    """The CPU test's tolerance (tests/test_bf16.py explains it): mean |ours - hf| within 10% of what bf16 itself
    does to transformers' logits, max within half of it."""
    path = request.getfixturevalue(fixture)
    idx = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ours16, hf16 = ours(path)(idx).float(), hf(path)(idx).logits.float()
        hf32 = hf(path, torch.float32)(idx).logits
    d16, noise = (ours16 - hf16).abs(), (hf16 - hf32).abs()
    print(f"{fixture}: mean |ours - hf| {d16.mean():.3g}, max {d16.max():.3g}; bf16 noise mean {noise.mean():.3g}")
    assert noise.max() > 1e-2  # bf16 really rounds here
    assert d16.mean() <= 0.1 * noise.mean() and d16.max() <= 0.5 * noise.max()


@pytest.mark.parametrize("fixture", MODELS)
def test_cuda_bf16_greedy_matches_generate(fixture, request):
    """Our KV-cached greedy decoder against transformers' `generate`, token for token, one prompt at a time and
    batched."""
    path = request.getfixturevalue(fixture)
    mine, ref = ours(path), hf(path)
    for s in range(4):
        prompt = torch.randint(3, 256, (5 + 3 * s,), generator=torch.Generator().manual_seed(s)).tolist()
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=40,
                                min_new_tokens=40, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(mine, prompt, 40) == want
    batch = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.no_grad():
        want = ref.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=30,
                            min_new_tokens=30, eos_token_id=None, pad_token_id=0)[:, 10:]
    assert torch.equal(decode_batch(mine, batch, 30), want)


def test_fsdp2_over_nccl_matches_unsharded(tiny_llama):
    """parallel.shard on a one-process nccl group: the sharded model's loss and LoRA gradients equal the plain
    model's (one GPU cannot hold two nccl ranks; tests/test_scale.py runs two processes on gloo)."""
    import torch.distributed as dist

    from data import Example
    from eval import answer_losses
    from lora import add_lora, lora_modules
    from parallel import shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        ex = [Example(i, torch.randint(3, 256, (6,), generator=g).tolist(),
                      torch.randint(3, 256, (30,), generator=g).tolist(), 30) for i in range(2)]
        results = []
        for sharded in (False, True):
            torch.manual_seed(0)
            m = ours(tiny_llama)
            add_lora(m, 4, ("q_proj", "v_proj"), init="standard")
            with torch.no_grad():
                for x in lora_modules(m).values():
                    x.lora_B.normal_(0, 0.3, generator=torch.Generator("cuda").manual_seed(1))
            if sharded:
                shard(m, 1)
            m.train()
            loss, _, _ = answer_losses(m, ex, pad_id=2)
            loss.mean().backward()
            results.append((loss.detach(), {n: x.lora_A.grad.clone() for n, x in lora_modules(m).items()}))
        (l0, g0), (l1, g1) = results
        assert torch.allclose(l0, l1, rtol=0, atol=1e-6)
        assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7) for k in g0)
    finally:
        dist.destroy_process_group()
