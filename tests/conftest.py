"""Shared fixtures: tiny random Llama/Qwen3 checkpoints that transformers builds offline."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def _randomize(model, seed=0):
    """transformers initialises norms to 1; randomise everything so the parity check covers them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
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
