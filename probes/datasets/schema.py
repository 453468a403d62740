"""The records the training pipeline passes around: questions with ground truth.

A :class:`Question` is one fact the model is asked about, with every answer that counts
as correct (aliases) and the entity it is about. The entity is the unit of every split:
all questions about France (capital, currency, language, ...) land on the same side, so
a probe can never be tested on an entity it saw in training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# "claims": a few sentences, labelled claim by claim against ``Question.values``
# (probes.labeling.label_claims) instead of as one short answer.
AnswerType = Literal["text", "number", "symbol", "claims"]
# plain: few-shot "Q:/A:" completion; chat: the shots as earlier turns of a chat;
# chat_zero_shot: the question alone in a chat; mixed: one of those three per question,
# picked by a seeded hash (``PromptRenderer.styles_for``), so a capture covers every style
# with one request per question.
PromptStyle = Literal["plain", "chat", "chat_zero_shot", "mixed"]
PROMPT_STYLES: tuple[PromptStyle, ...] = ("plain", "chat", "chat_zero_shot", "mixed")
CONCRETE_STYLES: tuple[PromptStyle, ...] = ("plain", "chat", "chat_zero_shot")


class Shot(BaseModel):
    """One worked example shown before the question (few-shot prompting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str
    answer: str


class Question(BaseModel):
    """A question with ground truth, produced by a dataset builder.

    ``answers`` are the accepted answers (the first is the canonical one); an answer that
    matches one of them after normalisation is a retrieval. ``near_misses`` are answers
    too vague to call right or wrong (``"dollar"`` for the Australian dollar): they are
    labelled ambiguous and left out. ``invented`` questions are about entities that do
    not exist, so any substantive answer is a fabrication.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    topic: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    entity: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)
    near_misses: list[str] = Field(default_factory=list)
    answer_type: AnswerType = "text"
    invented: bool = False
    shots: list[Shot] = Field(default_factory=list)
    # Which of the topic's wordings the question uses (``probes.datasets.phrasing``);
    # None for a question written outside the registry (users' data, held-out sets).
    phrasing: int | None = Field(default=None, ge=0)
    # Long-form questions (answer_type "claims"): every true value per attribute, and the
    # generation budget such an answer needs (None: the capture's default).
    values: dict[str, list[str]] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, ge=1, le=512)

    @field_validator("answers")
    @classmethod
    def _strip(cls, value: list[str]) -> list[str]:
        return [a.strip() for a in value if a and a.strip()]

    @model_validator(mode="after")
    def _check_answers(self) -> Question:
        if not self.invented and not self.answers:
            raise ValueError(f"question {self.id!r}: a real question needs at least one answer")
        if self.invented and self.answers:
            raise ValueError(f"question {self.id!r}: an invented question has no answers")
        return self


__all__ = ["CONCRETE_STYLES", "PROMPT_STYLES", "AnswerType", "PromptStyle", "Question", "Shot"]
