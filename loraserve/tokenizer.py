"""Tokenizer and chat template from an HF model directory, without transformers.

Uses the `tokenizers` library on tokenizer.json and renders the chat template
with jinja2, so serving does not import transformers. A chat prompt is the
token sequence transformers' `apply_chat_template(tokenize=True)` gives: the
same sandboxed Jinja environment and globals, the special tokens it passes,
and no special tokens added when the rendered text is encoded (the template
writes its own, so a BOS-adding post-processor would double the BOS).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from loraserve.errors import InvalidRequest
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
        self.special_tokens = {k: v for k in SPECIAL_TOKENS if (v := _token_str(cfg.get(k))) is not None}
        """What the template sees of them, as transformers passes its special_tokens_map."""
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

    def check_prompt_chars(self, chars: int, field: str, max_model_len: int) -> None:
        """Refuse a text that cannot fit the context, before it is tokenized
        (seconds for megabytes): n characters make at least n / max_token_chars
        tokens; the factor 2 leaves room for a normalizer that shortens text."""
        if chars > 2 * max_model_len * self.max_token_chars:
            raise InvalidRequest(field, f"{field} ({chars} characters) cannot fit the context length "
                                        f"{max_model_len} tokens")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        """Compiled on first use, once per tokenizer (compiling costs more than rendering)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        return _environment().from_string(self.chat_template)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
        """The chat template's text for `messages` (ValueError, or jinja2's
        TemplateError, on what the template refuses). `template_kwargs` are the
        template's own switches (vLLM's chat_template_kwargs, e.g. enable_thinking);
        they cannot replace the messages, tools or special tokens."""
        return self._template.render(**{**(template_kwargs or {}), **self.special_tokens, "messages": messages,
                                        "tools": tools, "documents": None,
                                        "add_generation_prompt": add_generation_prompt})

    def chat_tokens(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> list[int]:
        """The prompt's token ids, as `apply_chat_template(..., tokenize=True)` gives them."""
        text = self.render_chat(messages, tools, add_generation_prompt, template_kwargs)
        return self.encode(text, add_special_tokens=False)


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed (a
    template is code from the model directory), blocks trimmed, loop controls,
    and its globals and `tojson` (Jinja's own escapes HTML characters, which
    would change the tokens of any template that writes JSON)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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
    raise jinja2.TemplateError(message)
