"""Tokenizer from ``tokenizer.json`` (HF ``tokenizers``) and chat templates (jinja2).

Special tokens and the chat template come from ``tokenizer_config.json``;
extra EOS ids from ``generation_config.json``, as HF ``generate`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from .text_bound import TextBound, text_bound


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        eos_token_ids: Sequence[int] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        eos = list(eos_token_ids)
        if eos_token is not None and (tid := tok.token_to_id(eos_token)) is not None:
            eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None
        # Once, at start: it reads the whole tokenizer.json.
        self.text_bound: TextBound = text_bound(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``ValueError`` if it is not valid Unicode (HF tokenizers
        raises a ``TypeError`` on a lone surrogate)."""
        where = invalid_unicode_at(text)
        if where is not None:
            raise ValueError(f"the text is not valid Unicode: a lone surrogate at index {where}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` with the model's template (HF's jinja2 conventions)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json)")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = gen if isinstance(gen, list) else [] if gen is None else [gen]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(
            tok,
            eos_token_ids=[*eos_token_ids, *extra],
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            chat_template=template,
        )


class IncrementalDetokenizer:
    """Text deltas for a growing id list, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_tail)  # a little context so leading spaces decode right
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence: the held-back tail, incomplete characters and all
        (as U+FFFD), so that ``text`` equals decoding the whole output at once."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        """The text the unread ids add; before ``final``, none while it ends mid-character."""
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (not final and after.endswith("\ufffd")):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


def invalid_unicode_at(text: str) -> int | None:
    """The index of the first lone surrogate of ``text`` (JSON's ``"\\ud800"`` decodes to
    one; it has no UTF-8 form), or None when the text is valid Unicode."""
    if text.isascii():  # O(1) in CPython
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return int(exc.start)
    return None


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(tok: str | dict[str, Any] | None) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok
