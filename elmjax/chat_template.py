"""Chat templates: messages -> text spans, each marked trainable or not.

A template is Jinja, rendered the way Hugging Face tokenizers render
``chat_template`` (sandboxed environment, ``trim_blocks``/``lstrip_blocks``,
variables ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``). ``DEFAULT_TEMPLATE`` is::

    <|system|>\\n{content}\\n      (for each message, in order;
    <|user|>\\n{content}\\n         the role name between <| and |>)
    <|assistant|>\\n{content}\\n

which the byte tokenizer encodes as plain characters. EOS is not text here:
``elmjax.sft_data`` appends the tokenizer's EOS id after the last message.

Which text is trained on: the template is rendered on growing prefixes of
the conversation (it must render a prefix of the conversation as a prefix of
the whole, as chat templates do); message k's text is the difference between
consecutive renders. In an assistant message's text, the part from its
``content`` on (the content and the template's end-of-turn text) is trained;
the role header before it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elmjax.errors import UserError

DEFAULT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
ROLES = ("system", "user", "assistant")


class TemplateError(UserError):
    """A chat template that cannot be read, compiled or used."""


@dataclass(frozen=True)
class Span:
    text: str
    trained: bool


def template_source(spec: str) -> str:
    """The Jinja source ``spec`` names: 'default', an inline template, or a file."""
    if spec == "default":
        return DEFAULT_TEMPLATE
    if "{%" in spec or "{{" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TemplateError(f"sft.template: {spec!r} is neither 'default', a Jinja template nor a file")
    return path.read_text()


class ChatTemplate:
    def __init__(self, spec: str = "default"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = template_source(spec)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"sft.template: does not compile ({e})") from None

    def render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=False, bos_token="", eos_token="")
        except jinja2.TemplateError as e:
            raise TemplateError(f"sft.template: rendering failed ({e})") from None

    def spans(self, messages: list[dict], train_on_prompt: bool = False) -> list[Span]:
        """The rendered conversation as consecutive spans, trained or not."""
        spans: list[Span] = []
        done = ""
        for k, m in enumerate(messages):
            text = self.render(messages[: k + 1])
            if not text.startswith(done):
                raise TemplateError("sft.template: renders a conversation's prefix as something other than a prefix "
                                    "of the whole; loss masks cannot be placed")
            piece, done = text[len(done):], text
            if m["role"] != "assistant":
                spans.append(Span(piece, train_on_prompt))
                continue
            at = piece.find(m["content"]) if m["content"] else -1
            if at < 0:
                raise TemplateError("sft.template: an assistant message's content does not appear in its rendering")
            spans += [Span(piece[:at], train_on_prompt), Span(piece[at:], True)]
        return [s for s in spans if s.text]
