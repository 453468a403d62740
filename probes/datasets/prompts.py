"""Turn a question into the text the model reads: a plain few-shot prompt or a chat one.

``plain``::

    Q: What is the capital of France?
    A: Paris
    ...
    Q: What is the capital of Mongolia?
    A:

``chat``: the same shots as earlier user/assistant turns, rendered with the model's own
chat template (so it needs the tokenizer); ``chat_zero_shot``: the question alone, as a
user would ask it. Neither passes a system message, so the template's own default system
prompt applies where it has one (SmolLM2's names the assistant): the prompt a served chat
request without a system message gets. ``mixed`` renders each question in one of the
three, picked by a hash of its id (:meth:`PromptRenderer.styles_for`). All stop at the end
of the line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from probes.datasets.phrasing import choose
from probes.datasets.schema import CONCRETE_STYLES, PromptStyle, Question

logger = logging.getLogger(__name__)

STOP = ["\n"]
PROMPT_STYLE_NAMES = get_args(PromptStyle)


def plain_prompt(question: Question) -> str:
    parts = [f"Q: {s.question}\nA: {s.answer}" for s in question.shots]
    parts.append(f"Q: {question.question}\nA:")
    return "\n".join(parts)


def chat_messages(question: Question, *, shots: bool = True) -> list[dict[str, str]]:
    """The chat turns: the shots as earlier exchanges (unless ``shots=False``), then the
    question. No system turn: the chat template's default applies."""
    messages: list[dict[str, str]] = []
    for s in question.shots if shots else []:
        messages += [{"role": "user", "content": s.question},
                     {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": question.question})
    return messages


class PromptRenderer:
    """Renders prompts; loads the model's tokenizer lazily, only for the chat style."""

    def __init__(self, model_dir: str | Path | None = None, *, tokenizer: Any = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.model_dir is None:
                raise ValueError("the chat style needs the model folder (for its chat template)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def unsupported(self, style: PromptStyle) -> str | None:
        """Why this model cannot be prompted in ``style``, or None when it can."""
        if style in ("chat", "chat_zero_shot") and not getattr(self.tokenizer, "chat_template",
                                                                 None):
            return "the model's tokenizer has no chat template"
        if style not in PROMPT_STYLE_NAMES:
            return f"unknown prompt style {style!r} ({'|'.join(PROMPT_STYLE_NAMES)})"
        return None

    def usable_styles(self, styles: Sequence[PromptStyle]) -> list[PromptStyle]:
        """``styles`` less those the model cannot do, each skipped with a one-line note."""
        usable = []
        for style in styles:
            why = self.unsupported(style)
            if why:
                logger.warning("skipping the %s prompt style: %s", style, why)
            else:
                usable.append(style)
        return usable

    def styles_for(self, question: Question, styles: Sequence[PromptStyle],
                   *, seed: int = 0) -> list[PromptStyle]:
        """The concrete styles ``question`` is asked in: ``styles`` with ``mixed`` replaced
        by one usable concrete style picked by a hash of ``(seed, question id)``."""
        out: list[PromptStyle] = []
        for style in styles:
            if style == "mixed":
                usable = [s for s in CONCRETE_STYLES if self.unsupported(s) is None]
                style = usable[choose(f"style:{question.id}", len(usable), seed)]
            if style not in out:
                out.append(style)
        return out

    def render(self, question: Question, style: PromptStyle) -> str:
        if style == "plain":
            return plain_prompt(question)
        if style in ("chat", "chat_zero_shot"):
            return str(self.tokenizer.apply_chat_template(
                chat_messages(question, shots=style == "chat"), tokenize=False,
                add_generation_prompt=True,
            ))
        raise ValueError(f"cannot render prompt style {style!r} ({'|'.join(CONCRETE_STYLES)}; "
                         "mixed picks one per question: PromptRenderer.styles_for)")


__all__ = ["STOP", "PromptRenderer", "chat_messages", "plain_prompt"]
