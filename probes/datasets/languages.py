"""Languages: ISO 639-1 code, language from code, writing system, own name.

Ground truth: ``pycountry`` (ISO 639-1 codes and names) and ``langcodes`` with
``language-data`` (the likely script of each language, its English display name and its
autonym). Only languages with a two-letter code are asked about (about 180).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from probes.datasets.countries import _language_names, ascii_fold
from probes.datasets.facts import fact, shot_list, unique
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import import_package

DOMAIN = "languages"
MIN_SPEAKERS = 1_000_000
_SHOT_LANGUAGES = {"fr", "ja", "sv", "ru", "de", "es", "el"}
# ISO 15924 codes of combinations of scripts ("Jpan" = Han + Hiragana + Katakana): their
# names ("Japanese", "Simplified") are no answer to "which script".
_COMPOSITE_SCRIPTS = {"Hans", "Hant", "Jpan", "Kore", "Hrkt"}
_SCRIPT_ALIASES = {"Latin": ["Roman"]}

SHOTS = {
    "language_code": [
        ("What is the ISO 639-1 code of the French language?", "fr"),
        ("What is the ISO 639-1 code of the Japanese language?", "ja"),
        ("What is the ISO 639-1 code of the Swedish language?", "sv"),
    ],
    "language_from_code": [
        ("Which language has the ISO 639-1 code fr?", "French"),
        ("Which language has the ISO 639-1 code ja?", "Japanese"),
        ("Which language has the ISO 639-1 code sv?", "Swedish"),
    ],
    "language_script": [
        ("In which script is Russian usually written?", "Cyrillic"),
        ("In which script is Swedish usually written?", "Latin"),
        ("In which script is Greek usually written?", "Greek"),
    ],
    "language_autonym": [
        ("What do native speakers call the German language?", "Deutsch"),
        ("What do native speakers call the Spanish language?", "español"),
        ("What do native speakers call the Swedish language?", "svenska"),
    ],
}
PHRASINGS = {
    "language_code": ("What is the ISO 639-1 code of the {name} language?",
                      "Which two-letter ISO 639-1 code stands for {name}?",
                      "Give the ISO 639-1 language code of {name}."),
    "language_from_code": ("Which language has the ISO 639-1 code {name}?",
                           "The ISO 639-1 code {name} stands for which language?",
                           "Name the language whose ISO 639-1 code is {name}."),
    "language_script": ("In which script is {name} usually written?",
                        "Which writing system is normally used for {name}?",
                        "Name the script {name} is usually written in."),
    "language_autonym": ("What do native speakers call the {name} language?",
                         "What is the {name} language called in {name} itself?",
                         "Give the native name of the {name} language."),
}


def shots(topic: str) -> list[Shot]:
    return shot_list(SHOTS, topic)


@dataclass(frozen=True)
class Language:
    code: str
    name: str  # English display name (langcodes), the subject
    names: list[str]
    script: str  # English name of its usual script ("" for a composite one)
    autonym: str
    speakers: int


@functools.lru_cache(maxsize=1)
def languages() -> dict[str, Language]:
    """Every ISO 639-1 language whose English name is written in plain letters."""
    pycountry = import_package("pycountry")
    langcodes = import_package("langcodes")
    out: dict[str, Language] = {}
    for lang in pycountry.languages:
        code = getattr(lang, "alpha_2", None)
        if not code:
            continue
        tag = langcodes.Language.get(code)
        name = str(tag.display_name())
        if not re.fullmatch(r"[A-Za-z][A-Za-z '\-]+", ascii_fold(name)):
            continue
        script_code = tag.maximize().script or ""
        script = ("" if not script_code or script_code in _COMPOSITE_SCRIPTS
                  else re.sub(r"\s*\(.*?\)", "", langcodes.Language.get(f"und-{script_code}")
                              .script_name()))
        out[code] = Language(code=code, name=name,
                             names=unique([name, *_language_names(code)]),
                             script=script, autonym=str(tag.autonym()),
                             speakers=int(tag.speaking_population()))
    return out


def _rows() -> list[Language]:
    return [lang for code, lang in sorted(languages().items())
            if code not in _SHOT_LANGUAGES and lang.speakers >= MIN_SPEAKERS]


def _q(topic: str, lang: Language, slot: str, answers: list[str], *,
       answer_type: str = "text") -> Question:
    return fact(topic, DOMAIN, key=lang.code, entity=f"language:{lang.code}", subject=lang.name
                if topic != "language_from_code" else lang.code,
                question=PHRASINGS[topic][0].format(name=slot), answers=answers,
                shots=shots(topic), answer_type=answer_type)  # type: ignore[arg-type]


def build_language_code() -> list[Question]:
    return [_q("language_code", lang, lang.name, [lang.code], answer_type="symbol")
            for lang in _rows()]


def build_language_from_code() -> list[Question]:
    return [_q("language_from_code", lang, lang.code, lang.names) for lang in _rows()]


def build_language_script() -> list[Question]:
    """Languages whose script is not named after them ("Thai" is written in Thai: the
    answer would be a copy of the question, which no claim span judges)."""
    return [_q("language_script", lang, lang.name,
               [lang.script, *_SCRIPT_ALIASES.get(lang.script, [])])
            for lang in _rows() if lang.script
            and lang.script.casefold() not in lang.name.casefold()
            and lang.name.casefold() not in lang.script.casefold()]


def build_language_autonym() -> list[Question]:
    """Only autonyms in Latin letters that differ from the English name (a transliterated
    answer to "русский" could not be labelled)."""
    out = []
    for lang in _rows():
        folded = ascii_fold(lang.autonym)
        if (lang.autonym and re.fullmatch(r"[A-Za-z][A-Za-z '\-]+", folded)
                and len(folded) >= len(lang.autonym) - 2
                and folded.casefold() not in {n.casefold() for n in lang.names}):
            out.append(_q("language_autonym", lang, lang.name, [lang.autonym, folded]))
    return out


def known_names() -> set[str]:
    """Every language name and autonym (casefolded): invented names must avoid them."""
    return {ascii_fold(n).casefold() for lang in languages().values()
            for n in [*lang.names, lang.autonym]}


def known_codes() -> set[str]:
    return {code.casefold() for code in languages()}


__all__ = ["build_language_autonym", "build_language_code", "build_language_from_code",
           "build_language_script", "known_codes", "known_names", "languages"]
