"""Labelled questions for probe training: knowledge-base builders, prompts, users' JSONL."""

from probes.datasets.prompts import PromptRenderer, plain_prompt
from probes.datasets.registry import TOPICS, build_dataset, read_questions, write_questions
from probes.datasets.schema import PROMPT_STYLES, PromptStyle, Question, Shot
from probes.datasets.user import UserDataError, UserRecord, UserSpan, load_user_jsonl

__all__ = [
    "PROMPT_STYLES",
    "TOPICS",
    "PromptRenderer",
    "PromptStyle",
    "Question",
    "Shot",
    "UserDataError",
    "UserRecord",
    "UserSpan",
    "build_dataset",
    "load_user_jsonl",
    "plain_prompt",
    "read_questions",
    "write_questions",
]
