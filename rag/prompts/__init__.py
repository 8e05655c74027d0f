"""Chat formats of the served models, byte-exact, and context injection.

Formats (registry `FORMATS`): ``sciphi`` (SciPhi-Self-RAG-Mistral-7B-32k), ``selfrag``
(Self-RAG 7B/13B), ``mistral_inst`` (Mistral-7B-Instruct-v0.2 ``[INST]``), ``chatml``
(Mistral-7B-OpenOrca), ``plain`` (text completion for base models such as Mistral-7B-v0.2) and
``hf_template`` (the tokenizer's own chat template). No format writes the BOS token except where
the model card's text has it (``mistral_inst``): the generator's ``encode`` adds it once. Message contents
and retrieved context are untrusted: they are neutralised (see `rag.prompts.sanitize`) before
the format adds its own control strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rag.errors import PromptError
from rag.prompts.sanitize import REFLECTION_TOKENS, neutralize
from rag.types import ChatMessage, Passage

if TYPE_CHECKING:
    from rag.generation import Generator

ALPACA_CHAT_SYSTEM_PROMPT = (
    "Below is a series of instructions from a USER that describes a task, paired with an input "
    "that provides further context. The ASSISTANT writes a response that concisely and "
    "appropriately completes the request."
)
ROLES = ("system", "user", "assistant")
SCIPHI_CONTEXT = "[Retrieval] <paragraph>{context}</paragraph>"  # one space, as the card does
USER_CONTEXT = "Answer the question using the passage.\n\nPassage: {context}\n\nQuestion: {question}"


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """A conversation must be non-empty, use known roles and end with a user turn."""
    if not messages:
        raise PromptError("the conversation is empty; send at least one user message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise PromptError(f"messages[{i}].role {m.role!r} is not supported; use {', '.join(ROLES[:-1])} "
                              f"or {ROLES[-1]}")
    if messages[-1].role != "user":
        raise PromptError(f"the last message must come from the user, got {messages[-1].role!r}")


def last_user_message(messages: Sequence[ChatMessage]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    raise PromptError("the conversation has no user message")


class ChatFormat:
    """Renders a conversation (and optional retrieved context) into one prompt string.

    ``context_position="response"`` (default, the SciPhi flow) appends ``context_template``
    after the generation prompt; ``"user"`` rewrites the last user turn with ``context_template``
    (which then also takes ``{question}``), for models never tuned on the SciPhi layout.
    """

    name = "base"
    #: how retrieved context is appended after the generation prompt
    context_template = SCIPHI_CONTEXT

    def __init__(self, *, extra_control: Sequence[str] = (), context_template: str | None = None,
                 context_position: str = "response"):
        self.extra_control = tuple(extra_control)
        if context_position not in ("response", "user"):
            raise PromptError(f"context_position must be response or user, got {context_position!r}")
        self.context_position = context_position
        if context_position == "user":
            self.context_template = USER_CONTEXT
        if context_template is not None:
            self.context_template = context_template
        needed = ("{context}", "{question}") if context_position == "user" else ("{context}",)
        for field in needed:
            if field not in self.context_template:
                raise PromptError(f"context_template must contain {field} "
                                  f"(context_position={context_position})")

    def clean(self, text: str) -> str:
        return neutralize(text, self.extra_control)

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        raise NotImplementedError

    def render(self, messages: Sequence[ChatMessage], context: str | None = None) -> str:
        check_messages(messages)
        if context is not None and self.context_position == "user":
            content = self.context_template.format(context=self.clean(context),
                                                   question=self.clean(messages[-1].content))
            return self.conversation([*messages[:-1], ChatMessage(role="user", content=content)])
        prompt = self.conversation(messages)
        if context is not None:
            prompt += self.context_template.format(context=self.clean(context))
        return prompt


class SciPhiFormat(ChatFormat):
    """SciPhi-Self-RAG-Mistral-7B-32k (``get_chat_completion`` of its card).

    ``system_prompt`` defaults to the prompt the model was tuned with; the card appends a period
    to it, which yields ``request..`` - kept byte for byte, since the model saw it.
    """

    name = "sciphi"

    def __init__(self, *, system_prompt: str = ALPACA_CHAT_SYSTEM_PROMPT, **kw: Any):
        super().__init__(**kw)
        self.system_prompt = system_prompt

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        prompt, has_system = "", False
        for m in messages:
            content = self.clean(m.content)
            if m.role == "system":
                prompt += (f"### System:\n{self.system_prompt}. Further, the assistant is given the "
                           f"following additional instructions - {content}\n\n")
                has_system = True
            elif m.role == "user":
                prompt += f"### Instruction:\n{content}\n\n"
            else:
                prompt += f"### Response:\n{content}\n\n"
        if not has_system:
            prompt = f"### System:\n{self.system_prompt}.\n\n{prompt}"
        return prompt + "### Response:\n"


class SelfRagFormat(ChatFormat):
    """Self-RAG 7B/13B: ``### Instruction:`` (``### Input:``) ``### Response:``; a passage is
    ``[Retrieval]<paragraph>{title}\\n{text}</paragraph>`` (no space). Single-turn: the last user
    message is the instruction; earlier turns are not part of this format."""

    name = "selfrag"
    context_template = "[Retrieval]<paragraph>{context}</paragraph>"

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        return selfrag_prompt(self.clean(last_user_message(messages)))


def selfrag_prompt(instruction: str, input: str | None = None) -> str:
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def selfrag_paragraph(passage: Passage, extra_control: Sequence[str] = ()) -> str:
    """``[Retrieval]<paragraph>title\\ntext</paragraph>`` with the passage neutralised; the
    newline stays when there is no title, as the reference scripts and training data write it."""
    body = neutralize(f"{passage.title}\n{passage.text}", extra_control)
    return f"[Retrieval]<paragraph>{body}</paragraph>"


class MistralInstFormat(ChatFormat):
    """Mistral-7B-Instruct-v0.2: ``<s>[INST] {user} [/INST]{assistant}</s>[INST] ...``.

    The model has no system role: a system message is folded into the first user turn as
    ``{system}\\n\\n{user}``.
    """

    name = "mistral_inst"

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        system = "\n\n".join(self.clean(m.content) for m in messages if m.role == "system")
        out, first = "<s>", True
        for m in messages:
            if m.role == "system":
                continue
            content = self.clean(m.content)
            if m.role == "user":
                if first and system:
                    content = f"{system}\n\n{content}"
                out += f"[INST] {content} [/INST]"
                first = False
            else:
                out += f"{content}</s>"
        return out


class ChatMLFormat(ChatFormat):
    """ChatML (Mistral-7B-OpenOrca): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
    then ``<|im_start|>assistant\\n``."""

    name = "chatml"

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        body = "".join(f"<|im_start|>{m.role}\n{self.clean(m.content)}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"


class PlainFormat(ChatFormat):
    """Plain text completion for base models (Mistral-7B-v0.2): the turns' texts separated by
    blank lines, no role markers; retrieved context follows as ``Passage: ...`` and the prompt
    ends in ``Answer:`` for the model to complete."""

    name = "plain"
    context_template = "\n\nPassage: {context}\n\nAnswer:"

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        return "\n\n".join(self.clean(m.content) for m in messages)


class HFTemplateFormat(ChatFormat):
    """The model's own chat template (the generator's ``render_chat``, with the generation
    prompt)."""

    name = "hf_template"

    def __init__(self, generator: Generator | None, **kw: Any):
        super().__init__(**kw)
        if generator is None or not generator.has_chat_template:
            raise PromptError("this model's tokenizer has no chat template; choose a format: "
                              + ", ".join(n for n in FORMATS if n != "hf_template"))
        self.generator = generator

    def conversation(self, messages: Sequence[ChatMessage]) -> str:
        return self.generator.render_chat([{"role": m.role, "content": self.clean(m.content)}
                                           for m in messages])


FORMATS: dict[str, Callable[..., ChatFormat]] = {
    "sciphi": SciPhiFormat, "selfrag": SelfRagFormat, "mistral_inst": MistralInstFormat,
    "chatml": ChatMLFormat, "plain": PlainFormat, "hf_template": HFTemplateFormat,
}


def get_format(name: str, *, generator: Generator | None = None, **kw: Any) -> ChatFormat:
    """A format by name; ``hf_template`` renders through ``generator`` (a `Generator`)."""
    if name not in FORMATS:
        raise PromptError(f"unknown chat format {name!r}; use one of {', '.join(FORMATS)}")
    if name == "hf_template":
        return HFTemplateFormat(generator, **kw)
    return FORMATS[name](**kw)


_PARAGRAPH_SPAN = re.compile(r"<paragraph>.*?</paragraph>", re.DOTALL)
_CRUFT = re.compile("|".join(re.escape(t) for t in sorted(
    set(REFLECTION_TOKENS) | {"</s>"}, key=len, reverse=True)))


def remove_cruft(text: str) -> str:
    """SciPhi post-processing, completed: drop whole ``<paragraph>...</paragraph>`` spans, then
    every reflection token (all five utilities), unmatched paragraph tags and ``</s>``, then
    surrounding whitespace."""
    return _CRUFT.sub("", _PARAGRAPH_SPAN.sub("", text)).strip()
