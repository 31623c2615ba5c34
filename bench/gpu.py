"""LoRA training and greedy decoding on a Llama-3.1-8B-shaped model with random bf16 weights.

    python bench/gpu.py                                   # one CUDA GPU: 2048 and 8192 answer tokens, decode
    python bench/gpu.py --answer-tokens 2048 --activation-checkpointing
    python bench/gpu.py --probe paper                     # only the paper's probe (whole-MLP LoRA, one layer)
    python bench/gpu.py --shape tiny --device cpu --dtype fp32 --answer-tokens 64 --decode-tokens 8  # smoke test

The model is built from the config below on the meta device and filled with N(0, 0.02) weights
on the target device: no download, nothing read from disk. Each measurement prints one JSON line:
  peaks          measured bf16 matmul TFLOP/s (8192³) and device-memory copy bandwidth
  train/<probe>/<ℓ>  one training step (chunked CE over ℓ answer tokens after a 64-token prompt,
                 AdamW): seconds, tokens/s, MFU and peak memory. Probes: qv = rank-16 q,v LoRA on every
                 layer; paper = the paper's probe, a rank-16 whole-MLP LoRA on one layer at 2/3 depth
                 (layer 21 of 32), so backward stops at that layer.
                 MFU = the step's matmul FLOPs (`train_step.step_flops`: frozen weights need input
                 gradients only, so about 4·params·tokens, plus attention) / step time / the
                 measured matmul peak; also against the nominal peak where the GPU is known.
  decode         greedy tokens/s at batch 1 after a 128-token prompt, against the bandwidth limit:
                 every token reads all weights except the embedding table (about 15 GB in bf16),
                 so tokens/s cannot exceed bandwidth / those bytes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import best_seconds, emit

SHAPES = {  # Hugging Face config.json fields
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "tiny": dict(model_type="llama", vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, rms_norm_eps=1e-5, rope_theta=500000.0),
}
NOMINAL_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}  # dense
RANK = 16


def random_model(shape: str, device, dtype, checkpoint_layers: bool = False):
    """The shape's Transformer with random weights, built without reading anything."""
    from model import ModelArgs, Transformer, rope_inv_freq

    args = ModelArgs.from_config(SHAPES[shape])
    with torch.device("meta"):
        m = Transformer(args, checkpoint_layers=checkpoint_layers).to(dtype)
    m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    m.inv_freq = rope_inv_freq(args).to(device)
    return m.requires_grad_(False).eval(), args


def peaks(device, dtype) -> tuple[float, float]:
    """(matmul TFLOP/s, copy GB/s) measured here."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    tflops = 2 * n**3 / best_seconds(lambda: a @ b, 10, device) / 1e12
    size = 2**30 if device.type == "cuda" else 2**26  # bytes
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbs = 2 * size / best_seconds(lambda: dst.copy_(src), 10, device) / 1e9  # read + write
    return tflops, gbs


def train_step(model, args, answer_tokens: int, device, repeats: int, peak_tflops: float, nominal, probe: str,
               first_layer: int):
    from train_step import step_flops

    from data import Example
    from eval import answer_losses
    from lora import lora_parameters
    from memft import weighted_loss

    g = torch.Generator().manual_seed(answer_tokens)
    ids = torch.randint(0, args.vocab_size, (64 + answer_tokens,), generator=g).tolist()
    ex = Example(0, ids[:64], ids[64:], answer_tokens)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4, weight_decay=0.0)

    def step():
        loss, _, _ = answer_losses(model, [ex], 0)
        weighted_loss(loss, torch.ones_like(loss)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = best_seconds(step, repeats, device)
    T = 64 + answer_tokens - 1
    n_lora = sum(p.numel() for p in lora_parameters(model))
    flops = step_flops(args, T, first_layer, 0, answer_tokens, n_lora)
    row = dict(bench=f"gpu/train/{probe}/{answer_tokens}", probe=probe, answer_tokens=answer_tokens, seq_tokens=T + 1,
               step_s=round(s, 4), tokens_per_s=round((T + 1) / s, 1), tflop=round(flops / 1e12, 2),
               tflops=round(flops / s / 1e12, 1), mfu_measured_peak=round(flops / s / 1e12 / peak_tflops, 3),
               activation_checkpointing=model.checkpoint_layers)
    if nominal:
        row["mfu_nominal_peak"] = round(flops / s / 1e12 / nominal, 3)
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    emit(**row)


def decode(model, args, new_tokens: int, device, gbs: float) -> None:
    from eval import decode_batch

    prompt = torch.randint(0, args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)).to(device)
    t_prefill = best_seconds(lambda: decode_batch(model, prompt, 1), 3, device)
    t_all = best_seconds(lambda: decode_batch(model, prompt, new_tokens + 1), 3, device)
    per_token = (t_all - t_prefill) / new_tokens
    read = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if args.tie_embeddings:  # the head is the embedding table, and it is read every token
        read += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    limit = gbs * 1e9 / read
    emit(bench="gpu/decode", new_tokens=new_tokens, tokens_per_s=round(1 / per_token, 1),
         weights_read_gb=round(read / 1e9, 2), bandwidth_gbs=round(gbs, 1), limit_tokens_per_s=round(limit, 1),
         fraction_of_limit=round(1 / per_token / limit, 3))


def main(a) -> None:
    from lora import add_lora
    from model import default_device_dtype

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run on a GPU machine, or smoke-test with --shape tiny --device cpu")
    device, dtype = default_device_dtype(a.device, a.dtype)
    tflops, gbs = peaks(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None) if dtype == torch.bfloat16 else None
    emit(bench="gpu/peaks", device=name, dtype=a.dtype, matmul_tflops=round(tflops, 1), copy_gbs=round(gbs, 1),
         nominal_tflops=nominal)
    if a.decode_tokens:
        model, args = random_model(a.shape, device, dtype, a.activation_checkpointing)
        decode(model, args, a.decode_tokens, device, gbs)
        del model
    for probe in a.probe:
        model, args = random_model(a.shape, device, dtype, a.activation_checkpointing)
        if probe == "qv":
            first = 0
            add_lora(model, RANK, ("q_proj", "v_proj"))
        else:  # the paper preset's probe: whole-MLP adapter on one layer at 2/3 depth
            first = round(args.n_layers * 2 / 3)
            add_lora(model, RANK, ("mlp",), layers=[first], init="paper", dropout=0.1)
        model.train()
        for n in a.answer_tokens:
            train_step(model, args, n, device, a.repeats, tflops, nominal, probe, first)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="LoRA training and decoding on an 8B-shaped model with random weights.")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--answer-tokens", default="2048,8192", help="comma list of answer lengths to train on")
    ap.add_argument("--probe", default="qv,paper", help="comma list: qv (q,v on every layer) and/or paper (MLP probe)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens to time (0: skip decoding)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--activation-checkpointing", action="store_true")
    a = ap.parse_args()
    try:
        a.answer_tokens = [int(x) for x in a.answer_tokens.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"error: --answer-tokens takes a comma list of integers, got {a.answer_tokens!r}")
    a.probe = [x.strip() for x in a.probe.split(",") if x.strip()]
    if not a.probe or set(a.probe) - {"qv", "paper"}:
        sys.exit(f"error: --probe takes a comma list of qv and paper, got {','.join(a.probe)!r}")
    main(a)
