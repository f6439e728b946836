"""Tokenizer: `tokenizer.json` (the `tokenizers` library) plus `tokenizer_config.json`.

Handles the parts transformers users rely on: BOS/EOS insertion (the post-processor, overridden by
explicit `add_bos_token` / `add_eos_token`), added and special tokens, and the chat template
(from `tokenizer_config.json` or `chat_template.jinja`) rendered with jinja2 the way transformers
renders it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from lengthwise.model.config import CheckpointError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids for one checkpoint directory."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            hint = (" (only a SentencePiece tokenizer.model is present; lengthwise needs the fast-tokenizer "
                    "file tokenizer.json)" if (model_dir / "tokenizer.model").is_file() else "")
            raise CheckpointError(f"{model_dir}: tokenizer.json is missing{hint}")
        self._tok = _HFTokenizer.from_file(str(path))
        self._path = path
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._add_added_tokens(cfg.get("added_tokens_decoder", {}))
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(cfg.get(key))
            if content is not None:
                self.special_tokens[key] = content
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        # tokenizer.json's post-processor decides, unless the config sets add_bos_token/add_eos_token
        # explicitly (honoured as transformers 4.x Llama tokenizers do; an unset flag keeps the
        # post-processor's choice for that token).
        self._explicit = "add_bos_token" in cfg or "add_eos_token" in cfg
        probe = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        by_pp_bos = len(probe) > len(plain) and probe[0] == self.bos_token_id
        by_pp_eos = len(probe) > len(plain) and probe[-1] == self.eos_token_id
        self._add_bos = bool(cfg["add_bos_token"]) if cfg.get("add_bos_token") is not None else by_pp_bos
        self._add_eos = bool(cfg["add_eos_token"]) if cfg.get("add_eos_token") is not None else by_pp_eos
        self.chat_template, self.named_chat_templates = _load_chat_template(model_dir, cfg)
        self.model_max_length = cfg.get("model_max_length")

    def _add_added_tokens(self, decoder: dict[str, dict[str, Any]]) -> None:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        for spec in decoder.values():
            if spec["content"] in vocab:
                continue
            token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                               lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                               normalized=spec.get("normalized", False), special=spec.get("special", False))
            if token.special:
                self._tok.add_special_tokens([token])
            else:
                self._tok.add_tokens([token])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (e.g. '▁the', 'Ġthe', '<0x0A>'); None if out of range."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the checkpoint configures."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        if not add_special_tokens:
            return self._tok.encode(text, add_special_tokens=False).ids
        if not self._explicit:
            return self._tok.encode(text, add_special_tokens=True).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self._add_eos and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each list of ids (in parallel, in the tokenizers library)."""
        return self._tok.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (`<s>`, `<|im_end|>`; not `<think>`, which is text)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a byte token stands for, from the vocabulary: a byte-level BPE token
        ('Ġð' -> b' \\xf0') or a byte-fallback token ('<0xF0>' -> b'\\xf0'). These can hold part of
        a character, which `decode` can only show as U+FFFD. None for any other token (its text is
        whole characters; decode it) and for ids out of range."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return None
        byte_level, byte_fallback = self._byte_decoders
        if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                return None
        if byte_level and token_id not in self._added_ids:
            table = _byte_level_inverse()
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
        return None

    @functools.cached_property
    def _byte_decoders(self) -> tuple[bool, bool]:
        """(has a ByteLevel decoder, has a ByteFallback decoder), read once from tokenizer.json."""
        kinds: set[str] = set()

        def walk(spec: Any) -> None:
            if isinstance(spec, dict):
                kinds.add(spec.get("type", ""))
                for sub in spec.get("decoders") or []:
                    walk(sub)

        walk(json.loads(self._path.read_text()).get("decoder"))
        return "ByteLevel" in kinds, "ByteFallback" in kinds

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts with `role` and `content`) to the prompt text. With
        `tools`, a checkpoint's template named "tool_use" renders it, as transformers chooses;
        other `kwargs` (Qwen3's `enable_thinking`, say) are the template's variables.
        `continue_final_message`: the text ends where the last message's content does, so the model
        goes on writing it (a prefilled answer), as transformers cuts it."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        clash = sorted(set(kwargs) & {"messages", "add_generation_prompt", *self.special_tokens})
        if clash:
            raise ValueError(f"chat template variables {clash} are set by the server")
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; use a plain prompt instead")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of dicts, each with a 'role' and 'content'")
        try:
            source = self.chat_template
            if kwargs.get("tools") and "tool_use" in self.named_chat_templates:
                source = self.named_chat_templates["tool_use"]
            text = _compile_template(source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **self.special_tokens, **kwargs)
        except jinja2.TemplateError as e:  # templates reject e.g. a system role with raise_exception
            raise ValueError(f"chat template: {e}") from e
        if not continue_final_message:
            return text
        final = messages[-1].get("content")
        final = final if isinstance(final, str) else ""
        for piece in (final, final.strip()):
            if piece and piece in text:
                return text[:text.rindex(piece) + len(piece)]
        raise ValueError("continue_final_message: the last message's content is not in the rendered chat")

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_args: Any) -> list[int]:
        """Token ids of the rendered chat (`template_args` as `apply_chat_template` takes them); the
        template places BOS itself, so none is added here."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_args),
                           add_special_tokens=False)


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    other 68 are shifted to U+0100 and up (so a space is 'Ġ', a newline 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _load_chat_template(model_dir: Path, cfg: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The default chat template, and the named ones (Hermes ships "default" and "tool_use")."""
    template = cfg.get("chat_template")
    named: dict[str, str] = {}
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = model_dir / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return template, named


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers uses: sandboxed, trim/lstrip blocks, its helper globals.
    # Compiled once per template (about 2 ms each, as long as a tiny model's whole request).
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
