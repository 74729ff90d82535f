"""Chat messages -> one prompt string.

With `--model-dir DIR` of a Hugging Face checkpoint that has a chat template
(`DIR/chat_template.jinja`, which transformers prefers, else `chat_template` in
`DIR/tokenizer_config.json`: a string, or a list of named templates of which "default"
is used), the template is rendered as transformers' `apply_chat_template` does: Jinja2 in
an immutable sandbox, `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension and a
`{% generation %}` block, `tojson`, `raise_exception`, `strftime_now`, with `messages`,
`add_generation_prompt=True`, `tools=None` and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) from tokenizer_config.json.

Otherwise the default template: one `<role>: <content>` line per message, then
`assistant:` (DEFAULT_TEMPLATE_DOC). Message content is a string or a list of
`{"type": "text", "text": ...}` parts (joined); other parts are refused.

The prefill service tokenizes the rendered text as it tokenizes any prompt. When the
checkpoint's tokenizer.json adds the BOS token itself (a TemplateProcessing
post-processor starting with it) and the rendered text starts with `bos_token`, that
leading `bos_token` is dropped from the text so the prompt does not get two.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import invalid

DEFAULT_TEMPLATE_DOC = "<role>: <content>\\n per message, then 'assistant:'"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
            "mask_token")


class ChatTemplate:
    """`render(messages)` -> prompt text. `source`: where the template came from."""

    def __init__(self, template: str | None = None, special: dict[str, str] | None = None,
                 strip_bos: bool = False, source: str = "default") -> None:
        self.source = source
        self.special = special or {}
        self._strip = self.special.get("bos_token") if strip_bos else None
        self._compiled = _compile(template) if template is not None else None

    def render(self, messages: list[dict]) -> str:
        msgs = [_message(m, i) for i, m in enumerate(messages)]
        if self._compiled is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        import jinja2

        try:
            text = self._compiled.render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:  # raise_exception(...) of the template, sandbox
            raise invalid(f"chat template: {e}", "messages") from None
        if self._strip and text.startswith(self._strip):
            text = text[len(self._strip):]
        return text


def load(model_dir: str | None) -> ChatTemplate:
    """The checkpoint's template (module docstring), or the default one. A directory that
    does not exist, or a template that does not compile: ValueError (fail at start)."""
    if not model_dir:
        return ChatTemplate()
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"--model-dir {model_dir}: not a directory")
    cfg = _json(d / "tokenizer_config.json")
    template, source = None, "default"
    if (d / "chat_template.jinja").is_file():
        template, source = (d / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    elif cfg.get("chat_template"):
        template, source = _pick(cfg["chat_template"]), "tokenizer_config.json"
    if template is None:
        return ChatTemplate()
    special = {k: t for k in _SPECIAL if (t := _token_text(cfg.get(k))) is not None}
    try:
        return ChatTemplate(template, special, _tokenizer_adds_bos(d, special.get("bos_token")),
                            f"{d / source}")
    except Exception as e:  # jinja2.TemplateSyntaxError, ...
        raise ValueError(f"--model-dir {model_dir}: {source}: {e}") from None


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict):
        raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise invalid(f"messages[{i}].role must be a non-empty string", f"messages[{i}].role")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise invalid(f"messages[{i}].content[{j}]: only text parts are supported",
                              f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise invalid(f"messages[{i}].content must be a string or a list of text parts",
                      f"messages[{i}].content")
    out = {k: v for k, v in m.items() if k != "content"}
    out["content"] = content
    return out


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _pick(value: Any) -> str | None:
    """A template string, or the "default" one of a list of {"name", "template"}."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


def _token_text(tok: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _tokenizer_adds_bos(d: Path, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts `bos` first on a single sequence."""
    if not bos or not (d / "tokenizer.json").is_file():
        return False
    post = _json(d / "tokenizer.json").get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        single = p.get("single") if isinstance(p, dict) and p.get("type") == "TemplateProcessing" else None
        if single:
            first = single[0].get("SpecialToken", {}) if isinstance(single[0], dict) else {}
            return first.get("id") == bos
    return False


def _compile(template: str):
    """transformers' sandboxed environment (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # `{% generation %}...{% endgeneration %}`
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env.from_string(template)

