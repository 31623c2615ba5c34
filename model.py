"""Llama 3.x / Qwen3 (and Qwen2) written by hand, loaded from safetensors with Hugging Face names.

    python model.py FOLDER                 # load a model folder and print its shape
    python model.py FOLDER --dtype bf16

    from convert import resolve_model_dir  # 'default' (the built-in SmolLM2-135M), a folder or a hub id
    from model import load_model
    m = load_model(resolve_model_dir("default"))
    logits = m(input_ids)                  # (B, T, V)

Read this file first, top to bottom: the config, the pure math (RMSNorm, RoPE), the modules (attention
with its KV cache, the SwiGLU MLP, the block), the Transformer with its loss at the head, then
loading. Next: lora.py (how the adapter is injected), memft.py (the token weights), train.py
(`train_step`), eval.py (decoding and recall), fitlaw.py (the law).

Two fast paths sit beside the plain math, each equal to it and held to it by a test: `swiglu`
(less activation memory) and `ChunkedCE` (the loss without the (N, V) logits). Two options trade
speed for memory or compile time, set when the model is built: `checkpoint_layers` and
`compile_layers`. Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`,
...), so checkpoints load with `strict=True` and no key mapping, and LoRA export to PEFT is only a
key prefix.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.autograd.function import FunctionCtx

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

    def __post_init__(self) -> None:
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


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) for positions `pos` (T,), in HF's half-split layout."""
    freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd) by position; halves are (real, imag), not interleaved pairs."""
    x1, x2 = x.chunk(2, dim=-1)                        # (B, T, H, hd/2) each
    rotated = torch.cat([-x2, x1], dim=-1)             # (B, T, H, hd)
    return x * cos[:, None, :] + rotated * sin[:, None, :]  # cos, sin (T, hd) -> (T, 1, hd): the same for every head


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys/values for every layer, written at explicit positions: (L, B, n_kv, S, hd)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos0: int = 0) -> torch.Tensor:
        """x (B, T, D) at positions pos0..pos0+T-1 -> (B, T, D). With `kv`, this layer's cache buffers
        (B, n_kv, S, hd) each: the chunk's keys and values are written at pos0.. and attention reads
        every position up to the chunk's last."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)      # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)         # (B, T, n_kv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)         # (B, T, n_kv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or n_kv, T, hd)
        mask, causal = None, T > 1
        if kv is not None:  # write this chunk into the cache, attend over everything so far
            kbuf, vbuf = kv                                          # (B, n_kv, S, hd) each
            kbuf[:, :, pos0 : pos0 + T] = k
            vbuf[:, :, pos0 : pos0 + T] = v
            k, v = kbuf[:, :, : pos0 + T], vbuf[:, :, : pos0 + T]  # (B, n_kv, pos0 + T, hd)
            if T > 1 and pos0 > 0:  # chunk after a prefix: causal mask aligned bottom-right
                mask = torch.ones(T, pos0 + T, dtype=torch.bool, device=x.device).tril(pos0)  # (T, pos0 + T)
                causal = False
        # GQA: each kv head serves n_heads/n_kv query heads, without copying k and v per head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))        # (B, T, H·hd) -> (B, T, D)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with the gating product computed by `swiglu` (the same numbers)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # (B, T, D) -> (B, T, I) -> (B, T, D)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The plain math: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fast path: swiglu_reference's values and gradients, bit for bit, with less kept for backward
    (tests/test_model.py holds the two together)."""
    return SwiGLU.apply(gate, up)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward.

    Autograd on `F.silu(gate) * up` would also keep silu(gate), a third (T, intermediate) tensor per
    layer: a fifth of all activation memory in a LoRA run. Backward recomputes it instead, with the
    same kernels autograd would use, so gradients are bit-identical.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos0: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos0)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_block(block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """block(h, cos, sin), as a plain function that torch.compile and checkpointing can wrap."""
    return block(h, cos, sin)


class Transformer(nn.Module):
    """Embedding, n_layers blocks, final norm and head.

    Two options, fixed when the model is built, change speed and memory but not the numbers:
    - checkpoint_layers: in training, keep only each layer's input and recompute its activations in
      backward (activation checkpointing), for long answers;
    - compile_layers: run each layer through torch.compile on whole-sequence passes, which fuses its
      elementwise work (norms, RoPE, SwiGLU, residuals) and their backward. KV-cached decoding stays eager.
    """

    def __init__(self, args: ModelArgs, checkpoint_layers: bool = False, compile_layers: bool = False) -> None:
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
        self.checkpoint_layers = checkpoint_layers
        # Compiled on its first call; one graph then serves every layer.
        self.run_block = torch.compile(run_block) if compile_layers else run_block

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)  # (B, T) -> (B, T, D)

    def run_layers(self, h: torch.Tensor, start: int = 0, stop: int | None = None, pos0: int = 0,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Run decoder layers [start, stop) on hidden states h (B, T, D) at positions pos0.. .

        Plain: h = layer(h) for each layer. With a cache (decoding), each layer also writes its keys
        and values into it. Without one, the options of __init__ apply (the same numbers)."""
        pos = torch.arange(pos0, pos0 + h.shape[1], device=h.device)  # (T,)
        cos, sin = rope_cos_sin(self.inv_freq, pos, h.dtype)           # (T, hd) each
        stop = self.args.n_layers if stop is None else stop
        for i in range(start, stop):
            layer = self.model.layers[i]
            if cache is not None:
                h = layer(h, cos, sin, (cache.k[i], cache.v[i]), pos0)
            elif self.checkpoint_layers and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(self.run_block, layer, h, cos, sin, use_reentrant=False)
            else:
                h = self.run_block(layer, h, cos, sin)
        return h                                                       # (B, T, D)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden (..., D) -> logits (..., V)."""
        return self.lm_head(self.model.norm(h))

    def forward(self, idx: torch.Tensor, pos0: int = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) at positions pos0.. -> logits (B, T, V), or (B, 1, V) with last_only."""
        h = self.run_layers(self.embed(idx), pos0=pos0, cache=cache)
        return self.head(h[:, -1:] if last_only else h)

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor,
                     chunk: int | None = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy (N,) fp32 and argmax (N,) at final hidden states h (N, D), labels (N,).

        Plain (chunk=None): the logits (N, V) from `head`, then cross-entropy. The fast path (a chunk
        size, the default) gives the same numbers through ChunkedCE without holding the (N, V) logits;
        tests/test_model.py holds the two together."""
        if chunk is None:
            logits = self.head(h).float()                              # (N, V)
            return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(dim=-1)
        return ChunkedCE.apply(self.model.norm(h), self.lm_head.weight, labels, chunk)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.args, batch, max_len, p.device, p.dtype)


class ChunkedCE(torch.autograd.Function):
    """Per-token CE and argmax from normed hidden states, never materialising the (N, V) logits.

    Forward walks the N answer positions in chunks: logits = h·Wᵀ in fp32, loss_t = lse − logit[y],
    and, when a gradient is needed, g_t = (softmax − onehot(y))·W, the gradient of loss_t w.r.t.
    h_t. Backward is then only grad_loss_t · g_t. Any weighting Σ w_t·loss_t / Σw applied outside
    with detached w stays exact, and the cost equals one unchunked forward plus backward.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        N = h.shape[0]
        loss = torch.empty(N, dtype=torch.float32, device=h.device)
        pred = torch.empty(N, dtype=torch.long, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        for i in range(0, N, chunk):
            logits = (h[i : i + chunk] @ weight.t()).float()  # (c, V): the only (c, V) buffer
            y = labels[i : i + chunk]                                # (c,)
            pred[i : i + chunk] = logits.argmax(dim=-1)
            target = logits.gather(1, y[:, None]).squeeze(1)         # (c,): logit[y]
            top = logits.amax(dim=-1, keepdim=True)                  # (c, 1)
            p = logits.sub_(top).exp_()  # (c, V), in place: exp(logit - max), as logsumexp computes it
            total = p.sum(dim=-1, keepdim=True)                      # (c, 1)
            loss[i : i + chunk] = (top + total.log()).squeeze(1) - target  # lse - logit[y]
            if need_grad:
                p.div_(total)  # softmax
                p[torch.arange(len(y), device=p.device), y] -= 1.0  # softmax - onehot(y), (c, V)
                grad_h[i : i + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)  # (c, V) @ (V, D) -> (c, D)
        ctx.save_for_backward(grad_h)
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor, grad_pred: None) -> tuple[torch.Tensor, None, None, None]:
        (grad_h,) = ctx.saved_tensors
        return grad_loss[:, None].to(grad_h.dtype) * grad_h, None, None, None  # (N, 1) * (N, D)


# ----------------------------------------------------------------------------- loading


def read_config(path: Path) -> dict:
    """A model folder's config.json."""
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


def read_weights(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def default_device_dtype(device: str | torch.device | None = None,
                         dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one) and dtype (bf16 on GPU, fp32 on CPU) to use when none is given."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ModelError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
        dtype = names[dtype]
    # fp32 on CPU: bf16 matmuls are several times slower on AVX2 CPUs.
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               checkpoint_layers: bool = False, compile_layers: bool = False) -> Transformer:
    """A model folder (config.json, *.safetensors) -> a frozen Transformer in eval mode.

    Built on the meta device, then loaded with strict=True, assign=True. convert.resolve_model_dir
    turns 'default' (the built-in model) or a hub id into a folder. checkpoint_layers, compile_layers: see
    Transformer."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path}; pass a folder with config.json and *.safetensors "
                         f"(convert.resolve_model_dir resolves 'default' and hub ids)")
    device, dtype = default_device_dtype(device, dtype)
    args = ModelArgs.from_config(read_config(path))
    sd = read_weights(path, device, dtype)
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the tie is ours to make
    with torch.device("meta"):
        model = Transformer(args, checkpoint_layers, compile_layers)
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
    return model.requires_grad_(False).eval()


def main(folder: str, dtype: str | None) -> None:
    """Load a model folder and print its shape and load time."""
    t0 = time.perf_counter()
    m = load_model(folder, dtype=dtype)
    n = sum(p.numel() for p in m.parameters())
    a = m.args
    print(f"{folder}: {a.model_type}, {a.n_layers} layers, dim {a.dim}, heads {a.n_heads}/{a.n_kv_heads}, "
          f"{n / 1e6:.1f}M params, {m.lm_head.weight.dtype} on {m.lm_head.weight.device}, "
          f"loaded in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Load a Llama/Qwen model folder and print its shape.",
                                 epilog="The built-in model's folder: python convert.py")
    ap.add_argument("folder", help="a Hugging Face model folder (config.json and *.safetensors)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on GPU")
    a = ap.parse_args()
    try:
        main(a.folder, a.dtype)
    except ModelError as e:
        sys.exit(f"error: {e}")
