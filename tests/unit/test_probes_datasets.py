"""Dataset builders: every question has ground truth, aliases work, invented names are new."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from probes.datasets import countries, elements, invented, us_states
from probes.datasets.prompts import PromptRenderer, chat_messages, plain_prompt
from probes.datasets.registry import TOPICS, build_dataset, read_questions, write_questions
from probes.datasets.schema import Question
from probes.labeling import label_answer, normalize


def _by_subject(questions: list[Question]) -> dict[str, Question]:
    return {q.subject: q for q in questions}


def test_every_topic_builds_questions_with_ground_truth() -> None:
    questions = build_dataset()
    counts = Counter(q.topic for q in questions)
    assert set(counts) == set(TOPICS)
    assert all(n >= 25 for n in counts.values()), counts
    for q in questions:
        assert q.question.endswith(("?", ".")), q.question
        assert len(q.shots) >= 2, q.id
        assert q.phrasing is not None
        if q.invented:
            assert not q.answers and q.entity.startswith("invented:")
        else:
            assert q.answers, q.id
    assert len({q.id for q in questions}) == len(questions)


def test_country_capitals_and_their_aliases() -> None:
    caps = _by_subject(countries.build_country_capital())
    assert caps["Germany"].answers[0] == "Berlin"
    assert caps["Peru"].answers[0] == "Lima"
    assert "Ulan Bator" in caps["Mongolia"].answers  # a transliteration from geonames
    assert label_answer(caps["Mongolia"], " Ulan Bator").label == "retrieval"
    assert label_answer(caps["Australia"], " Sydney").label == "fabrication"
    assert label_answer(caps["Australia"], " Canberra").label == "retrieval"
    # the country's own name is not an alias of its capital
    assert label_answer(caps["Andorra"], " Andorra").label != "retrieval"
    assert "France" not in caps and "Japan" not in caps  # used as few-shot examples


def test_currency_aliases_distinguish_shared_names() -> None:
    cur = _by_subject(countries.build_country_currency())
    aus = cur["Australia"]
    assert label_answer(aus, " Australian dollar").label == "retrieval"
    assert label_answer(aus, " AUD").label == "retrieval"
    assert label_answer(aus, " Dollar").label == "ambiguous"  # near miss
    assert label_answer(aus, " US dollar").label == "fabrication"
    assert label_answer(cur["China"], " Chinese renminbi").label == "retrieval"
    assert label_answer(cur["Germany"], " Euro").label == "retrieval"


def test_languages_continents_and_cities() -> None:
    lang = _by_subject(countries.build_country_language())
    assert "German" in lang["Germany"].answers
    assert label_answer(lang["Canada"], " French").label == "retrieval"
    cont = _by_subject(countries.build_country_continent())
    assert cont["Germany"].answers == ["Europe"]
    assert label_answer(cont["Egypt"], " Asia").label == "ambiguous"  # transcontinental
    cities = _by_subject(countries.build_city_country())
    assert "Shanghai" in cities and cities["Shanghai"].entity == "country:CN"
    assert label_answer(cities["Shanghai"], " China").label == "retrieval"
    assert Counter(q.entity for q in cities.values()).most_common(1)[0][1] <= 3


def test_elements_from_the_mendeleev_database() -> None:
    sym = _by_subject(elements.build_element_symbol())
    assert "Iron" not in sym  # a few-shot example
    assert sym["Lead"].answers == ["Pb"] and sym["Lead"].answer_type == "symbol"
    assert label_answer(sym["Lead"], " Pb").label == "retrieval"
    assert label_answer(sym["Lead"], " Le").label == "fabrication"
    num = _by_subject(elements.build_element_number())
    assert num["Uranium"].answers == ["92"]
    assert label_answer(num["Uranium"], " 92").label == "retrieval"
    assert label_answer(num["Uranium"], " The atomic number of uranium is 238.").label == \
        "fabrication"
    name = _by_subject(elements.build_element_from_symbol())
    assert "Aluminium" in name["Aluminum"].answers
    disc = _by_subject(elements.build_element_discoverer())
    assert "Cavendish" in disc["Hydrogen"].answers
    assert "Gold" not in disc  # known to the ancients: no discoverer to check against
    assert label_answer(disc["Hydrogen"], " Henry Cavendish").label == "retrieval"


def test_us_states() -> None:
    caps = _by_subject(us_states.build_state_capital())
    assert caps["Iowa"].answers == ["Des Moines"]
    assert label_answer(caps["Minnesota"], " St. Paul").label == "retrieval"
    abbr = _by_subject(us_states.build_state_abbreviation())
    assert label_answer(abbr["Nebraska"], " NE").label == "retrieval"
    years = _by_subject(us_states.build_state_statehood())
    assert years["Hawaii"].answers == ["1959"]


def test_invented_entities_do_not_exist_and_are_reproducible() -> None:
    a = invented.build_invented(per_template=10, seed=3)
    b = invented.build_invented(per_template=10, seed=3)
    assert [q.id for q in a] == [q.id for q in b]
    assert len(a) == 10 * len(invented.TEMPLATES)
    known = countries.known_names() | elements.known_names() | us_states.known_names()
    for q in a:
        assert q.invented and q.subject.casefold() not in known
        if q.answer_type == "claims":  # long form: tests/unit/test_probes_longform.py
            continue
        assert label_answer(q, " Paris").label == "fabrication"
        assert label_answer(q, " There is no such place.").label == "refusal"


def test_limit_per_topic_and_jsonl_round_trip(tmp_path: Path) -> None:
    questions = build_dataset(["country_capital", "element_symbol", "invented_city_country"],
                              limit_per_topic=7, seed=1)
    assert Counter(q.topic for q in questions) == {
        "country_capital": 7, "element_symbol": 7, "invented_city_country": 7}
    again = build_dataset(["country_capital"], limit_per_topic=7, seed=1)
    assert [q.id for q in again] == [q.id for q in questions if q.topic == "country_capital"]
    path = write_questions(questions, tmp_path / "q.jsonl")
    assert read_questions(path) == questions
    with pytest.raises(ValueError, match="unknown topic"):
        build_dataset(["no_such_topic"])


def test_prompts_plain_and_chat() -> None:
    q = _by_subject(countries.build_country_capital())["Peru"]
    text = plain_prompt(q)
    assert text.startswith("Q: What is the capital of France?\nA: Paris\n")
    assert text.endswith("Q: What is the capital of Peru?\nA:")
    messages = chat_messages(q)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]

    class FakeTokenizer:
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"

    rendered = PromptRenderer(tokenizer=FakeTokenizer()).render(q, "chat")
    assert rendered.endswith("<user>What is the capital of Peru?<assistant>")
    with pytest.raises(ValueError, match="model folder"):
        PromptRenderer().render(q, "chat")


def test_normalisation_is_shared_with_labelling() -> None:
    assert normalize("  The São Tomé!") == "sao tome"
    assert normalize("St. Paul") == normalize("Saint Paul")


def test_chat_styles_use_the_templates_default_system_prompt(tokenizer) -> None:
    """With the real SmolLM2 tokenizer: no system turn of ours, so its template's own
    default system prompt opens both chat styles; zero-shot has no earlier turns."""
    q = _by_subject(countries.build_country_capital())["Peru"]
    renderer = PromptRenderer(tokenizer=tokenizer)
    few = renderer.render(q, "chat")
    zero = renderer.render(q, "chat_zero_shot")
    default = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    system = default[: default.index("x")].rsplit("<|im_start|>user", 1)[0]
    assert "<|im_start|>system" in system and "SmolLM" in system
    for text in (few, zero):
        assert text.startswith(system) and text.count("<|im_start|>system") == 1
        assert text.endswith("What is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in few and "Paris" not in zero
    assert zero.count("<|im_start|>user") == 1 and few.count("<|im_start|>user") == 4


def test_mixed_style_picks_one_style_per_question_reproducibly() -> None:
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"

    questions = countries.build_country_capital()
    renderer = PromptRenderer(tokenizer=Chat())
    picked = [renderer.styles_for(q, ["mixed"]) for q in questions]
    assert all(len(p) == 1 for p in picked)
    assert Counter(p[0] for p in picked).keys() == {"plain", "chat", "chat_zero_shot"}
    assert picked == [renderer.styles_for(q, ["mixed"]) for q in questions]
    assert renderer.styles_for(questions[0], ["plain", "chat"]) == ["plain", "chat"]
    with pytest.raises(ValueError, match="mixed picks one per question"):
        renderer.render(questions[0], "mixed")

    class PlainOnly:
        chat_template = None

    plain_only = PromptRenderer(tokenizer=PlainOnly())
    assert {plain_only.styles_for(q, ["mixed"])[0] for q in questions} == {"plain"}
