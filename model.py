"""Llama 3.x / Qwen3 (and Qwen2) written by hand, loaded from safetensors with Hugging Face names.

    python model.py                      # load the built-in SmolLM2-135M and print its shape
    python model.py --model Qwen/Qwen3-8B --dtype bf16

    from model import load_model
    m = load_model("default")            # or a local folder, or a hub id
    logits = m(input_ids)                # (B, T, V)

Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints
load with `strict=True` and no key mapping, and LoRA export to PEFT is only a key prefix.
"""

import functools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SUPPORTED = ("llama", "qwen2", "qwen3")


class ModelError(Exception):
    """A problem with a model folder or checkpoint, worded for the user."""


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0  # 0 -> n_heads (plain multi-head attention)
    head_dim: int = 0  # 0 -> dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    max_seq_len: int = 4096

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a Hugging Face config.json dict (transformers 4 or 5 RoPE keys)."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise ModelError(f"unsupported model_type {mt!r} in config.json; supported: {', '.join(SUPPORTED)}")
        # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ModelError(f"unsupported rope scaling type {kind!r}; supported: llama3")
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bias,
            o_bias=False if mt == "qwen2" else bias,
            qk_norm=mt == "qwen3",
            max_seq_len=cfg.get("max_position_embeddings", 4096),
        )


# ----------------------------------------------------------------------------- pure math


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm normalised in fp32 (torch's fused kernel), cast back, then scaled, as Hugging Face does."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with the `llama3` long-context rescaling when configured."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if not s:
        return inv
    # llama3: keep high frequencies, divide low ones by `factor`, blend the band in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) for positions `pos` (T,), in HF's half-split layout."""
    freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd) by position; halves are (real, imag), not interleaved pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys/values for every layer, written at explicit positions: (L, B, n_kv, S, hd)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)

    def forward(self, x, cos, sin, kv=None, pos0=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        mask, causal = None, T > 1
        if kv is not None:  # write this chunk into the cache, attend over everything so far
            kbuf, vbuf = kv
            kbuf[:, :, pos0 : pos0 + T] = k
            vbuf[:, :, pos0 : pos0 + T] = v
            k, v = kbuf[:, :, : pos0 + T], vbuf[:, :, : pos0 + T]
            if T > 1 and pos0 > 0:  # chunk after a prefix: causal mask aligned bottom-right
                mask = torch.ones(T, pos0 + T, dtype=torch.bool, device=x.device).tril(pos0)
                causal = False
        # GQA: each kv head serves n_heads/n_kv query heads, without copying k and v per head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward.

    Autograd on `F.silu(gate) * up` would also keep silu(gate), a third (T, intermediate) tensor per
    layer: a fifth of all activation memory in a LoRA run. Backward recomputes it instead, with the
    same kernels autograd would use, so gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, kv=None, pos0=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos0)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_block(block: nn.Module, h, cos, sin):
    return block(h, cos, sin)


@functools.cache
def compiled_run_block():
    """run_block with each layer's elementwise work (norms, RoPE, SwiGLU, residuals, and their
    backward) fused by torch.compile. Built on first use, since importing the compiler takes
    seconds; compiled on the first call, and one graph then serves every layer."""
    return torch.compile(run_block)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(args.vocab_size, args.dim),
                layers=nn.ModuleList(Block(args) for _ in range(args.n_layers)),
                norm=RMSNorm(args.dim, args.norm_eps),
            )
        )
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.activation_checkpointing = False  # settings, like `training`
        self.compile_layers = False  # torch.compile for whole-sequence passes (not KV-cached decoding)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)  # (B, T, D)

    def run_layers(self, h, start=0, stop=None, pos0=0, cache: KVCache | None = None) -> torch.Tensor:
        """Run decoder layers [start, stop) on hidden states h (B, T, D) at positions pos0.. ."""
        pos = torch.arange(pos0, pos0 + h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(self.inv_freq, pos, h.dtype)
        stop = self.args.n_layers if stop is None else stop
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        run = compiled_run_block() if self.compile_layers and cache is None else run_block
        for i in range(start, stop):
            if cache is not None:
                h = self.model.layers[i](h, cos, sin, (cache.k[i], cache.v[i]), pos0)
            elif recompute:  # keep only each layer's input; recompute its activations in backward
                h = torch.utils.checkpoint.checkpoint(run, self.model.layers[i], h, cos, sin, use_reentrant=False)
            else:
                h = run(self.model.layers[i], h, cos, sin)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden (..., D) -> logits (..., V)."""
        return self.lm_head(self.model.norm(h))

    def forward(self, idx, pos0=0, cache=None, last_only=False):
        h = self.run_layers(self.embed(idx), pos0=pos0, cache=cache)
        return self.head(h[:, -1:] if last_only else h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.args, batch, max_len, p.device, p.dtype)


# ----------------------------------------------------------------------------- loading


def resolve_model_dir(name_or_path: str | None) -> Path:
    """'default' or None -> the built-in model; a folder -> itself; 'org/name' -> a hub snapshot."""
    if name_or_path in (None, "", "default"):
        from convert import builtin_model_dir  # the one-time GGUF conversion lives beside us

        return builtin_model_dir()
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, gated repo...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"model {name!r} is not a local folder and could not be fetched from the "
                f"Hugging Face hub ({msg[:160]}); pass a local folder, or 'default' for the built-in model"
            ) from None
    raise ModelError(f"model folder not found: {p}; pass a folder with config.json and *.safetensors, or 'default'")


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise ModelError(f"no config.json in {path}; is this a Hugging Face model folder?")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{f} is not valid JSON ({e})") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"shard {missing[0]} listed in {index.name} is missing from {path}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
    return [single]


def read_weights(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    """All tensors from the folder's safetensors file(s), cast as they are read (never unpickled)."""
    from safetensors import safe_open

    sd = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    sd[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except Exception as e:  # safetensors raises its own error type on a truncated/corrupt header
            raise ModelError(f"cannot read {f}: corrupt or not a safetensors file ({str(e)[:120]})") from None
    return sd


def default_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ModelError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
        dtype = names[dtype]
    # fp32 on CPU: bf16 matmuls are several times slower on AVX2 CPUs.
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(name_or_path=None, dtype=None, device=None) -> Transformer:
    """Build on the meta device and load weights with strict=True, assign=True; the base is frozen."""
    path = resolve_model_dir(name_or_path)
    device, dtype = default_device_dtype(device, dtype)
    args = ModelArgs.from_config(read_config(path))
    sd = read_weights(path, device, dtype)
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the tie is ours to make
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "lm_head.weight")}
    for k, shape in expected.items():
        if k not in sd:
            raise ModelError(f"checkpoint in {path} lacks tensor {k!r} (wrong architecture or truncated file?)")
        if sd[k].shape != shape:
            raise ModelError(f"tensor {k!r} has shape {tuple(sd[k].shape)} but config.json implies {tuple(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ModelError(f"checkpoint has unexpected tensor {extra[0]!r} (and {len(extra) - 1} more); config mismatch?")
    if args.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # buffers built on meta need real values
    model.name = str(name_or_path or "default")
    return model.requires_grad_(False).eval()


def main(model: str, dtype: str | None) -> None:
    t0 = time.perf_counter()
    m = load_model(model, dtype=dtype)
    n = sum(p.numel() for p in m.parameters())
    a = m.args
    print(f"{m.name}: {a.model_type}, {a.n_layers} layers, dim {a.dim}, heads {a.n_heads}/{a.n_kv_heads}, "
          f"{n / 1e6:.1f}M params, {m.lm_head.weight.dtype} on {m.lm_head.weight.device}, "
          f"loaded in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Load a Llama/Qwen model and print its shape.")
    ap.add_argument("--model", default="default", help="'default' (built-in SmolLM2-135M), a folder, or a hub id")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on GPU")
    a = ap.parse_args()
    try:
        main(a.model, a.dtype)
    except ModelError as e:
        sys.exit(f"error: {e}")
