"""LoRA injected by module replacement, including the paper's whole-MLP probe; PEFT-compatible export.

    python lora.py                       # inject into a tiny random model and show what changed

    from lora import adapter_disabled, add_lora, load_adapter, save_adapter
    n = add_lora(model, rank=16, targets=("q_proj", "v_proj"))           # standard PEFT-style LoRA
    n = add_lora(model, rank=4, targets=("mlp",), layers=[20], init="paper", dropout=0.1)  # output dropout
    with adapter_disabled(model): ...                                     # the frozen reference model
    save_adapter(model, "runs/x"); load_adapter(fresh_model, "runs/x")

Read after model.py: the `LoRA` wrapper, then `add_lora`, which swaps it in with setattr. The
adapter's settings live in its modules (`adapter_config` reads them back), not on the model.

One wrapper computes y = base(x) + s·B(A(x)), with dropout where the preset puts it: on the adapter's
output for the paper, y = base(x) + drop(s·B(A(x))), as the authors' intervention does; on its input
for the standard preset, y = base(x) + s·B(A(drop(x))), as PEFT does. B starts at zero, so the model
is unchanged at step 0. On the `mlp` target the whole MLP block is wrapped: the adapter reads the MLP
input (the post-attention RMSNorm output) and adds to the MLP output, h_out = h_mid + MLP(x) + s·x·Aᵀ·Bᵀ.
"""

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = LINEAR + ("mlp",)
PRESETS = {
    # The paper's probe: one whole-MLP adapter at ~2/3 depth, kaiming with fan_in = r, s = 1, and
    # dropout 0.1 on the adapter's output (the authors' lora_dropout(x @ A @ B)).
    "paper": dict(targets=("mlp",), init="paper", dropout=0.1, dropout_at="output"),
    "standard": dict(targets=("q_proj", "v_proj"), init="standard", dropout=0.0, dropout_at="input"),
    # Your own facts: standard LoRA on q_proj, v_proj of the top third of the layers only (20..29 of 30;
    # settings.resolve_lora), chosen by docs/placement.py's table: it kept the rest of the model best.
    "facts": dict(targets=("q_proj", "v_proj"), init="standard", dropout=0.0, dropout_at="input"),
}


class LoraError(Exception):
    """Impossible LoRA settings or an unreadable adapter, worded for the user."""


class LoRA(nn.Module):
    """Wraps `base` (d_in -> d_out) and adds a low-rank update s·B·A; A is (r, d_in), B is (d_out, r)."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, rank: int, alpha: float, scale: float, dropout: float,
                 init: str, dropout_at: str) -> None:
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, scale
        self.dropout, self.dropout_at, self.init = dropout, dropout_at, init
        dev = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=dev, dtype=torch.float32))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled, self.merged = False, False
        if init == "paper":  # the paper's kaiming call took fan_in = r: U(±1/√r)
            nn.init.uniform_(self.lora_A, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
        else:  # PEFT: kaiming_uniform(a=√5) over fan_in = d_in, i.e. U(±1/√d_in)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                                  # (..., d_out)
        if self.disabled or self.merged:
            return y
        # LoRA weights stay fp32 (master copy); compute in the activations' dtype (bf16 on GPU).
        a = self.drop(x) if self.dropout_at == "input" else x
        z = F.linear(F.linear(a, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))  # (..., d_out)
        if self.dropout_at == "output":
            z = self.drop(z)
        return y + self.scale * z

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to a linear base's weight."""
        return self.scale * self.lora_B @ self.lora_A  # (d_out, d_in)


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """HF module path of each wrapped module (e.g. 'model.layers.3.self_attn.q_proj') -> its LoRA."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRA)}


def _site(block: nn.Module, target: str) -> tuple[nn.Module, str]:
    """Parent module and attribute name of a target inside one decoder block."""
    if target == "mlp":
        return block, "mlp"
    return (block.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp), target


def adapted_width(args: object, targets: tuple[str, ...] | list[str]) -> int:
    """The narrowest side (input or output width) among the targets' modules, from the model's ModelArgs: a
    rank above it cannot add anything (k_proj and v_proj are the narrowest under grouped-query attention)."""
    q, kv, mid = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    shapes = dict(q_proj=(args.dim, q), k_proj=(args.dim, kv), v_proj=(args.dim, kv), o_proj=(q, args.dim),
                  gate_proj=(args.dim, mid), up_proj=(args.dim, mid), down_proj=(mid, args.dim), mlp=(args.dim, args.dim))
    return min(min(shapes[t]) for t in targets)


def check_settings(model: nn.Module, rank: int, targets: tuple[str, ...], layers: list[int] | None) -> list[int]:
    """Validate rank/targets/layers against the model; returns the layer list."""
    n_layers = model.args.n_layers
    if not isinstance(rank, int) or rank <= 0:
        raise LoraError(f"rank must be a positive integer, got {rank}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise LoraError(f"unknown LoRA target {bad[0] if bad else '(none)'!r}; choose from {', '.join(TARGETS)}")
    if "mlp" in targets and any(t in ("gate_proj", "up_proj", "down_proj") for t in targets):
        raise LoraError("target 'mlp' wraps the whole MLP block; do not combine it with gate/up/down_proj")
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    out = [i for i in layers if not 0 <= i < n_layers]
    if out or not layers:
        raise LoraError(f"layer {out[0] if out else '(none)'} out of range: this model has layers 0..{n_layers - 1}")
    width = adapted_width(model.args, targets)
    if rank > width:
        raise LoraError(f"rank {rank} exceeds the width of the adapted modules ({width}, the narrowest side of "
                        f"{', '.join(targets)}); choose a rank of {width} or less")
    return layers


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
             layers: list[int] | None = None, alpha: float | None = None, dropout: float = 0.0,
             init: str = "standard", dropout_at: str | None = None) -> int:
    """Wrap each target in each chosen layer; freeze everything else. Returns the trainable count."""
    targets = tuple(targets)
    layers = check_settings(model, rank, targets, layers)
    if lora_modules(model):
        raise LoraError("this model already carries an adapter")
    if init not in ("paper", "standard"):
        raise LoraError(f"unknown init {init!r}; choose paper or standard")
    if dropout_at is None:  # each init's own preset: the authors drop the output, PEFT the input
        dropout_at = "output" if init == "paper" else "input"
    if dropout_at not in ("input", "output"):
        raise LoraError(f"unknown dropout_at {dropout_at!r}; choose input or output")
    alpha = rank if alpha is None else alpha  # s = alpha/r = 1 by default, as in the paper
    scale = 1.0 if init == "paper" else alpha / rank
    model.requires_grad_(False)
    for i in layers:
        block = model.model.layers[i]
        for t in targets:
            parent, attr = _site(block, t)
            base = getattr(parent, attr)
            d_in, d_out = (model.args.dim, model.args.dim) if t == "mlp" else (base.in_features, base.out_features)
            lora = LoRA(base, d_in, d_out, rank, alpha, scale, dropout, init, dropout_at)
            setattr(parent, attr, lora.train(base.training))
    return sum(p.numel() for p in lora_parameters(model))


def adapter_config(model: nn.Module) -> dict:
    """The adapter's settings, read back from its modules: what adapter.json records."""
    mods = lora_modules(model)
    if not mods:
        raise LoraError("this model carries no adapter")
    m = next(iter(mods.values()))  # add_lora gives every module the same settings
    layers = sorted({int(name.split(".")[2]) for name in mods})  # 'model.layers.<i>.…'
    targets = [t for t in TARGETS if any(name.endswith("." + t) for name in mods)]
    return dict(rank=m.rank, alpha=m.alpha, scale=m.scale, targets=targets, layers=layers, dropout=m.dropout,
                dropout_at=m.dropout_at, init=m.init)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's A and B: the only trainable weights."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn every adapter off: the frozen base, i.e. the reference for L_init."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold s·B·A into the base weights of linear targets, for inference at base speed."""
    modules = lora_modules(model)
    for name, m in modules.items():  # check all first: never leave the model half-merged
        if not isinstance(m.base, nn.Linear):
            raise LoraError(f"{name}: the whole-MLP probe is not linear and cannot be merged")
    for m in modules.values():
        if not m.merged:
            m.base.weight += m.delta_weight().to(m.base.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge`."""
    for m in lora_modules(model).values():
        if m.merged:
            m.base.weight -= m.delta_weight().to(m.base.weight.dtype)
            m.merged = False


# ----------------------------------------------------------------------------- saving and loading


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapter's A and B, fp32 on the CPU, under '<module path>.lora_A' / '.lora_B'."""
    return {f"{name}.{k}": getattr(m, k).detach().float().cpu().contiguous()
            for name, m in lora_modules(model).items() for k in ("lora_A", "lora_B")}


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via a temporary sibling and a rename, so a crash never leaves it half-written."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException:  # a failed write (full disk, Ctrl-C) leaves no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def unwrapped_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their Hugging Face names, adapters left out: after `merge` they hold them."""
    wrapped = set(lora_modules(model))
    out = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        if parts[-1] in ("lora_A", "lora_B") and ".".join(parts[:-1]) in wrapped:
            continue
        # 'model.layers.3.self_attn.q_proj.base.weight' -> 'model.layers.3.self_attn.q_proj.weight'
        parts = [p for i, p in enumerate(parts) if not (p == "base" and ".".join(parts[:i]) in wrapped)]
        out[".".join(parts)] = t
    return out


CHECKSUM = "weights_sha256"  # adapter.json's record of adapter.safetensors; adapters saved before it have none
ADAPTER_KEYS = dict(rank=int, targets=list, layers=(list, type(None)), alpha=(int, float), dropout=(int, float), init=str)


def save_adapter(model: nn.Module, path: str | Path, info: dict | None = None) -> None:
    """Our format always (adapter.safetensors + adapter.json); PEFT's too when every target is linear.

    adapter.json is `adapter_config(model)` plus `info`: train.py passes the base model (`base_model`,
    and its folder `base_model_path`, which PEFT's base_model_name_or_path then names) and how training
    formatted prompts (`prompt`); and the sha256 of adapter.safetensors, which `load_adapter` checks.
    """
    from safetensors.torch import save, save_file

    sd = lora_state_dict(model)
    weights = save(sd)  # adapter.safetensors' bytes
    cfg = adapter_config(model) | (info or {}) | {CHECKSUM: hashlib.sha256(weights).hexdigest()}

    def write(d: Path) -> None:
        (d / "adapter.safetensors").write_bytes(weights)
        (d / "adapter.json").write_text(json.dumps(cfg, indent=1))
        if "mlp" in cfg["targets"]:
            return  # PEFT has no whole-block adapter; our format only
        peft = {f"base_model.model.{k}.weight": v for k, v in sd.items()}  # <module>.lora_A -> ...lora_A.weight
        save_file(peft, str(d / "adapter_model.safetensors"))
        all_layers = cfg["layers"] == list(range(model.args.n_layers))
        # PEFT scales by lora_alpha / r, so export the alpha that gives our s: the paper init forces s = 1
        # whatever alpha says. PEFT's dropout sits on the input; it acts only in training, not on loading.
        (d / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", task_type="CAUSAL_LM", r=cfg["rank"], lora_alpha=cfg["scale"] * cfg["rank"],
            lora_dropout=cfg["dropout"], target_modules=cfg["targets"], bias="none", fan_in_fan_out=False,
            layers_to_transform=None if all_layers else cfg["layers"],
            base_model_name_or_path=cfg.get("base_model_path") or cfg.get("base_model"),
            inference_mode=True, use_rslora=False, init_lora_weights=True), indent=1))

    atomic_dir(Path(path), write)


def adapter_settings(path: str | Path) -> dict:
    """A saved adapter's adapter.json, read and checked without loading anything."""
    path = Path(path)
    missing = [f for f in ("adapter.json", "adapter.safetensors") if not (path / f).is_file()]
    if len(missing) == 2:
        raise LoraError(f"no adapter in {path} (expected adapter.json and adapter.safetensors)")
    if missing:
        raise LoraError(f"{path / missing[0]} is missing; the adapter folder is incomplete: retrain it, or copy "
                        f"the whole folder again")
    f = path / "adapter.json"
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise LoraError(f"{f} is damaged (not valid JSON{where}); retrain the adapter, or copy its folder "
                        f"again") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{f} is damaged (a JSON {type(cfg).__name__}, not an object); retrain the adapter, or copy "
                        f"its folder again")
    for k, kind in ADAPTER_KEYS.items():
        if k not in cfg or not isinstance(cfg[k], kind) or isinstance(cfg[k], bool):
            got = "no" if k not in cfg else f"a bad ({json.dumps(cfg[k])})"
            raise LoraError(f"{f} has {got} {k!r}; retrain the adapter, or copy its folder again")
    return cfg


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved adapter's settings and tensors, without a model: adapter.json checked, adapter.safetensors
    whole and, when adapter.json records its sha256, unchanged since it was saved."""
    from safetensors.torch import load

    path = Path(path)
    cfg = adapter_settings(path)
    f = path / "adapter.safetensors"
    data = f.read_bytes()
    try:
        sd = load(data)
    except Exception as e:  # safetensors' own error: a truncated file, a bad header
        raise LoraError(f"{f} is damaged ({str(e).strip() or type(e).__name__}); retrain the adapter, or copy "
                        f"its folder again") from None
    want = cfg.pop(CHECKSUM, None)
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise LoraError(f"{f} does not match the sha256 that adapter.json records: its weights changed since they "
                        f"were saved (damaged, or edited). Retrain the adapter; if you changed the weights on "
                        f"purpose, save them with lora.save_adapter, which records the new checksum")
    return cfg, sd


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Put a saved adapter (our format) onto a freshly loaded model; returns its settings.

    Everything about the files is checked before the model is touched (`read_adapter`); an adapter for
    another model is refused with the first layer, target or shape that does not fit.
    """
    path = Path(path)
    cfg, sd = read_adapter(path)
    base = cfg.get("base_model_path") or cfg.get("base_model")
    trained_on = f" (it was trained on {base})" if base else ""
    # Adapters saved before dropout_at was recorded get their init's default (None -> inferred).
    try:
        add_lora(model, cfg["rank"], cfg["targets"], cfg["layers"], cfg["alpha"], cfg["dropout"], cfg["init"],
                 cfg.get("dropout_at"))
    except LoraError as e:
        raise LoraError(f"the adapter in {path} does not fit this model: {e}{trained_on}") from None
    cfg["dropout_at"] = adapter_config(model)["dropout_at"]
    mods = lora_modules(model)
    want = {f"{n}.{k}" for n in mods for k in ("lora_A", "lora_B")}
    if set(sd) != want:
        raise LoraError(f"adapter in {path} does not fit this model (tensor names differ){trained_on}")
    params = {key: getattr(mods[key.rsplit(".", 1)[0]], key.rsplit(".", 1)[1]) for key in sorted(sd)}
    for key, p in params.items():  # every shape first: no weights copied from an adapter that does not fit
        if p.shape != sd[key].shape:
            raise LoraError(f"{path / 'adapter.safetensors'} does not fit this model: tensor {key} has shape "
                            f"{tuple(sd[key].shape)}, the model's is {tuple(p.shape)}{trained_on}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(sd[key])
    return cfg


def main() -> None:
    """A tour on a tiny random Llama: inject, check the model is unchanged at step 0, merge, disable."""
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=100, dim=32, n_layers=2, n_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 100, (1, 8))
    before = model(ids)
    n = add_lora(model, rank=4, targets=("q_proj", "v_proj"), alpha=8)
    print(f"add_lora(rank=4, targets=q_proj,v_proj, alpha=8): {n:,} trainable parameters in {len(lora_modules(model))} "
          f"modules: {', '.join(lora_modules(model))}")
    print(f"adapter_config: {adapter_config(model)}")
    print(f"B starts at zero, so the model is unchanged: max |Δlogits| = {(model(ids) - before).abs().max():.1e}")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    after = model(ids)
    with adapter_disabled(model):
        off = model(ids)
    merge(model)
    merged = model(ids)
    print(f"after a random B: the adapter moves the logits by {(after - before).abs().max():.3f}; with "
          f"adapter_disabled it is the base again ({(off - before).abs().max():.1e}); merged into the base weights it "
          f"gives the same logits ({(merged - after).abs().max():.1e})")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="LoRA injection, disabling, merging and PEFT export: a library that train.py "
                                             "uses. Run without arguments for a short tour on a tiny random model; "
                                             "the module docstring shows the calls.")
    ap.parse_args()
    main()
