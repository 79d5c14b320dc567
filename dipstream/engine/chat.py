"""A model's chat template rendered without transformers: the same sandboxed Jinja environment
transformers' `apply_chat_template` compiles (jinja2's ImmutableSandboxedEnvironment, trim_blocks and
lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`, a `dict` and a
`namespace` that refuse attribute tricks, `{% generation %}` blocks rendered as their content), so a
capped run's `--chat` loads neither transformers nor torch. The template is data from the user's
folder: the sandbox refuses access to Python internals, and nothing else runs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from dipstream.errors import DipstreamError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def chat_template(folder: Path) -> str:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's (its default one
    when it names several); one-line error when there is none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    t = _tokenizer_config(folder).get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not isinstance(t, str) or not t:
        raise DipstreamError(f"the tokenizer in {folder} has no chat template (a base model): give an instruct "
                             "model, or a plain prompt (`generate` without --chat)")
    return t


def _tokenizer_config(folder: Path) -> dict:
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DipstreamError(f"{path} is not readable JSON ({type(e).__name__}); export the model again") from None
    return doc if isinstance(doc, dict) else {}


def special_tokens(folder: Path) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json (bos_token, eos_token, ...) as strings."""
    config, out = _tokenizer_config(folder), {}
    for name in SPECIAL_TOKENS:
        v = config.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[name] = v
    return out


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask templates): its content."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

        def _content(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def render_chat(folder: Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template writes it (one-line error for a template that
    does not compile or refuses the conversation)."""
    import jinja2

    try:
        template = _environment().from_string(chat_template(folder))
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens(folder))
    except jinja2.exceptions.TemplateError as e:
        raise DipstreamError(f"the chat template in {folder} failed ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
