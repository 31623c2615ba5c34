"""Tokenizer, chat template and the memorization tasks (PhoneBook, long-context, linear rule).

    python data.py --task phonebook --length 100        # show what a task looks like
    python data.py --task longctx --length 200 --noise 0.4

    from data import load_tokenizer
    tok = load_tokenizer("default")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Every example is a (key, answer) pair: the prompt is the chat-formatted key, and only the answer's
tokens are supervised. The length ℓ is always measured in answer tokens, never hard-coded.
"""

import json
from datetime import datetime
from pathlib import Path


class DataError(Exception):
    """A problem with a tokenizer or a dataset, worded for the user."""


def _token_str(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """tokenizer.json through `tokenizers`, the chat template through `jinja2`, as transformers does."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        f = path / "tokenizer.json"
        if not f.is_file():
            raise DataError(f"no tokenizer.json in {path}; the model folder needs a Hugging Face tokenizer")
        self.tk = HFTokenizer.from_file(str(f))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template = template
        self.special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_id = self._eos_id(path)

    def _eos_id(self, path: Path) -> int | None:
        if self.special["eos_token"] is not None:
            return self.tk.token_to_id(self.special["eos_token"])
        for name in ("generation_config.json", "config.json"):
            f = path / name
            if f.is_file():
                eos = json.loads(f.read_text()).get("eos_token_id")
                if eos is not None:
                    return eos[0] if isinstance(eos, list) else eos
        return None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template rendered to text, with the same Jinja environment transformers uses."""
        if not self.chat_template:
            raise DataError("this tokenizer has no chat_template in tokenizer_config.json")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **kwargs
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # Special tokens in the rendered text are matched as added tokens; no BOS/EOS is added on top.
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))


_TEMPLATES: dict = {}


def _compile(source: str):
    """Compile once: a sandboxed env with trim_blocks/lstrip_blocks, like transformers' chat templating."""
    if source not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DataError(f"chat template error: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def load_tokenizer(name_or_path=None) -> Tokenizer:
    """The tokenizer of a model folder, hub id or 'default' (resolved as load_model does)."""
    from model import resolve_model_dir

    return Tokenizer(resolve_model_dir(name_or_path))
