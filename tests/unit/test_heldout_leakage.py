"""No held-out entity, subject, template or question text can reach a training set.

Checked against the real knowledge bases: the full ``build_dataset()`` (every training
topic, real and invented) against every held-out topic and long-form subject.
"""

from __future__ import annotations

import re

import pytest

from probes.datasets import heldout
from probes.datasets.countries import ascii_fold
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.registry import build_dataset
from probes.datasets.schema import Question


def _fold(text: str) -> str:
    return ascii_fold(text).casefold().strip()


def _template(q: Question) -> str:
    return _fold(q.question.replace(q.subject, "{}"))


@pytest.fixture(scope="module")
def training() -> list[Question]:
    return build_dataset()


@pytest.fixture(scope="module")
def held() -> list[Question]:
    return heldout.build_heldout()


def test_no_heldout_entity_reaches_training(training: list[Question],
                                            held: list[Question]) -> None:
    assert not [q.id for q in training if is_heldout_entity(q.entity)]
    train_entities = {q.entity for q in training}
    leaked = sorted({q.entity for q in held} & train_entities)
    assert not leaked, leaked
    longform = {s.entity for s in heldout.longform_subjects()}
    assert not sorted(longform & train_entities)


def test_no_heldout_subject_question_or_template_reaches_training(
        training: list[Question], held: list[Question]) -> None:
    train_subjects = {_fold(q.subject) for q in training}
    train_questions = {_fold(q.question) for q in training}
    train_templates = {_template(q) for q in training}
    train_shots = {_fold(s.question) for q in training for s in q.shots}
    for q in held:
        assert _fold(q.subject) not in train_subjects, q.id
        assert _fold(q.question) not in train_questions | train_shots, q.id
        assert _template(q) not in train_templates, q.id
        for shot in q.shots:  # the held-out wording is new even in its examples
            assert _fold(shot.question) not in train_questions | train_shots, q.id
    for s in heldout.longform_subjects():
        if s.invented:
            assert _fold(s.name) not in train_subjects, s.name
    # no training question mentions a held-out invented subject anywhere in its text
    invented = {_fold(q.subject) for q in held if q.invented}
    invented |= {_fold(s.name) for s in heldout.longform_subjects() if s.invented}
    text = " ".join(_fold(q.question) for q in training)
    assert not [n for n in invented if re.search(rf"\b{re.escape(n)}\b", text)]


def test_heldout_topics_have_questions_of_both_kinds(held: list[Question]) -> None:
    by_topic: dict[str, list[Question]] = {}
    for q in held:
        by_topic.setdefault(q.topic, []).append(q)
    assert set(by_topic) == set(heldout.TOPICS)
    for topic, qs in by_topic.items():
        assert len(qs) >= 15, (topic, len(qs))
        assert all(q.invented == topic.endswith("_invented") for q in qs)
        assert all(is_heldout_entity(q.entity) for q in qs), topic
    assert len({q.id for q in held}) == len(held)


def test_heldout_selection_is_stable_and_spares_few_shot_entities() -> None:
    assert is_heldout_entity("country:DE") == is_heldout_entity("country:DE")
    for iso in ("FR", "JP", "KE", "MX", "SE", "BR"):
        assert not is_heldout_entity(f"country:{iso}")
    share = sum(is_heldout_entity(f"element:{n}") for n in range(1, 119)) / 118
    assert 0.1 < share < 0.3
    assert not is_heldout_entity("topic:anything") and not is_heldout_entity("country:")
    subjects = heldout.longform_subjects()
    assert sum(s.invented for s in subjects) == 30 and sum(not s.invented for s in subjects) >= 20
    assert all(s.values["capital"] for s in subjects if not s.invented)
