"""Tokenizer and chat template from an HF model directory, without transformers.

Uses the `tokenizers` library on tokenizer.json and renders the chat template
with jinja2, so serving does not import transformers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as _HFTokenizer

from loraserve.model.spec import ModelError


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{model_dir}: tokenizer.json not found")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; ValueError if it is not valid Unicode. Long texts
        go through `encode_batch`, which releases the GIL (plain `encode` holds
        it), so a caller on a worker thread does not stall the event loop."""
        check_text(text)
        if len(text) < 4096:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token covers more of
        the input (entries are written at least as long as the text they stand
        for), so a text of n characters has at least n / this many tokens."""
        return max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def check_text(text: str) -> None:
    """Raise ValueError if `text` cannot be UTF-8: a lone surrogate, which JSON
    can carry as an unpaired \\ud800-\\udfff escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"lone surrogate {text[e.start]!r} at character {e.start} is not valid Unicode text "
                         f"(an unpaired \\ud800-\\udfff escape?)") from None


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise(message: str):
    raise ValueError(message)
