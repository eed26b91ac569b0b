"""IFEval: verifiable instruction following, in IFEval's own record format and scoring.

Records are IFEval's JSONL (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``), so
google/IFEval's ``input_data.jsonl`` loads unchanged. Each of the 25 official instruction ids
is a small checker in :data:`CHECKERS`. Their semantics, quirks included, are those of
lm-evaluation-harness's ``lm_eval/tasks/ifeval`` (the reference); ``tests/eval/test_ifeval.py``
shows that the per-instruction booleans equal the reference's on a corpus of responses. The
four figures are IFEval's: prompt- and instruction-level accuracy, strict and loose.

The reference picks random arguments when an instruction's kwargs are missing, zero or out of
range; here such a record is refused when it is loaded, so every score is reproducible.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import nltk
from nltk.tokenize import NLTKWordTokenizer, RegexpTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer

from instruct.data.templates import to_messages
from instruct.eval.suite import EvalContext, Score, Suite, SuiteResult, register_suite

# Written by scripts/make_ifeval_set.py; used when eval.ifeval.path is not set.
SHIPPED_SET = Path(__file__).resolve().parents[1] / "data" / "ifeval.jsonl"

FIGURES = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")

# The two comparisons IFEval's "relation" kwargs name.
RELATIONS: Mapping[str, Callable[[int, int], bool]] = MappingProxyType(
    {"less than": operator.lt, "at least": operator.ge}
)

# The ISO 639-1 codes IFEval's response_language accepts (the reference looks the code up in
# this table to word its instruction, so any other code fails there).
LANGUAGES: Mapping[str, str] = MappingProxyType(
    {
        "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
        "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
        "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil",
        "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew",
        "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
        "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
    }
)  # fmt: skip

CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


# ---------------------------------------------------------------------------------------------
# Text tools: sentence splitting, word tokens, language detection


def _has_punkt_english() -> bool:
    """Whether nltk's Punkt English parameters (``punkt_tab/english``) are installed.

    The reference loads ``tokenizers/punkt/english.pickle``, which nltk >= 3.9 serves from
    ``punkt_tab/english``. nltk cannot fetch it here (no network), and no package on PyPI
    ships it; ``nltk.data.find`` only looks on disk, so nothing is ever downloaded.
    """
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def sentence_splitter() -> str:
    """Which sentence splitter scores use: ``"punkt_tab/english"`` (the reference's) or
    ``"punkt (untrained)"`` where nltk's punkt_tab data is not installed."""
    return "punkt_tab/english" if _has_punkt_english() else "punkt (untrained)"


def _sentence_tokenizer() -> PunktSentenceTokenizer:
    if _has_punkt_english():
        return nltk.tokenize.PunktTokenizer("english")
    # Punkt's algorithm with nothing learned: no abbreviations, so it splits after every
    # ".", "?" or "!" that ends a token ("Mr. Smith." is two sentences, "e.g. this" too);
    # punkt_tab's English parameters know "mr", "e.g" and many more
    return PunktSentenceTokenizer()


@dataclass(frozen=True)
class TextTools:
    """What checkers count and detect with; built once per scoring run, since loading
    langdetect's language profiles is slow.
    (measured: docs/performance.md, "Measurements behind design choices")"""

    splitter: str  # sentence_splitter()'s name for ``sentences``
    sentences: PunktSentenceTokenizer
    words: NLTKWordTokenizer
    # Words as the reference counts them. Not re.findall(r"\w+"): recent nltk runs this
    # pattern on the `regex` engine, whose \w also takes combining marks (Devanagari vowel
    # signs), so a Hindi sentence has fewer, whole words.
    word_runs: RegexpTokenizer
    languages: Any  # a langdetect DetectorFactory with its profiles loaded

    @classmethod
    def load(cls) -> TextTools:
        # imported here, so that the suite registry imports without langdetect installed
        try:
            from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
        except ImportError as e:
            raise ImportError("IFEval scoring needs langdetect: pip install langdetect") from e
        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        # langdetect samples n-grams at random; unseeded (as the reference calls it), a short
        # or mixed text can get a different language on each call. Seed 0 is langdetect's own
        # documented way to make it deterministic, set on our factory, not its global one.
        factory.set_seed(0)
        return cls(
            sentence_splitter(),
            _sentence_tokenizer(),
            NLTKWordTokenizer(),
            RegexpTokenizer(r"\w+"),
            factory,
        )

    def count_sentences(self, text: str) -> int:
        return len(self.sentences.tokenize(text))

    def count_words(self, text: str) -> int:
        return len(self.word_runs.tokenize(text))

    def word_tokens(self, text: str) -> list[str]:
        """``nltk.word_tokenize``: sentences first, then the Treebank-style word tokenizer
        (sentence ends change tokens: "DONE." at a sentence end is two tokens)."""
        return [tok for sent in self.sentences.tokenize(text) for tok in self.words.tokenize(sent)]

    def detect_language(self, text: str) -> str | None:
        """langdetect's ISO code for ``text``; None where it finds nothing to go on."""
        from langdetect.lang_detect_exception import LangDetectException

        detector = self.languages.create()
        detector.append(text)
        try:
            return detector.detect()
        except LangDetectException:
            return None


# ---------------------------------------------------------------------------------------------
# Kwarg validation: one validator per official kwarg name


def _positive_int(value: Any) -> None:
    # bool is an int in Python; true/false in a count is a broken record, not 1/0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")
    # 0 never gets here (falsy kwargs are dropped); a negative one the reference replaces
    # with a random number
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")


def _any_int(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")


def _string(value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")


def _compiles(pattern: str, value: str) -> None:
    # The reference builds regular expressions from these strings, unescaped
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"is used in a regular expression and {value!r} breaks it: {e}") from e


def _keyword(value: Any) -> None:
    _string(value)
    _compiles(value.strip(), value)


def _string_list(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {value!r}")


def _keywords(value: Any) -> None:
    _string_list(value)
    for word in value:
        _compiles(word, word)


def _forbidden_words(value: Any) -> None:
    _string_list(value)
    for word in value:
        _compiles(rf"\b{word}\b", word)


def _postscript_marker(value: Any) -> None:
    _string(value)
    _compiles(r"\s*" + value.strip().lower() + r".*$", value)


def _section_spliter(value: Any) -> None:
    _string(value)
    _compiles(r"\s?" + value.strip() + r"\s?\d+\s?", value)


def _relation(value: Any) -> None:
    if value not in RELATIONS:
        raise ValueError(f"must be one of {sorted(RELATIONS)}, got {value!r}")


def _language(value: Any) -> None:
    if value not in LANGUAGES:
        raise ValueError(f"must be one of IFEval's language codes {sorted(LANGUAGES)}")


def _letter(value: Any) -> None:
    # the reference replaces anything but one letter a-z (either case) with a random one
    lower = value.lower() if isinstance(value, str) and len(value) == 1 else ""
    if len(lower) != 1 or not "a" <= lower <= "z":
        raise ValueError(f"must be one letter a-z, got {value!r}")


KWARGS: Mapping[str, Callable[[Any], None]] = MappingProxyType(
    {
        "keywords": _keywords,
        "keyword": _keyword,
        "frequency": _positive_int,
        "relation": _relation,
        "forbidden_words": _forbidden_words,
        "letter": _letter,
        "let_frequency": _positive_int,
        "let_relation": _relation,
        "language": _language,
        "num_sentences": _positive_int,
        "num_paragraphs": _positive_int,
        "num_words": _positive_int,
        "nth_paragraph": _positive_int,
        "first_word": _string,
        "num_placeholders": _positive_int,
        "postscript_marker": _postscript_marker,
        "num_bullets": _positive_int,
        "num_highlights": _positive_int,
        "section_spliter": _section_spliter,  # sic: IFEval's spelling
        "num_sections": _positive_int,
        "end_phrase": _string,
        # the reference checks no range here: a negative frequency is taken as it is
        "capital_frequency": _any_int,
        "capital_relation": _relation,
        "prompt_to_repeat": _string,
    }
)


# ---------------------------------------------------------------------------------------------
# The checkers

Check = Callable[[str, Mapping[str, Any], TextTools], bool]


@dataclass(frozen=True)
class Checker:
    """One instruction id: the kwargs it takes (all required) and its test of a response."""

    id: str
    params: tuple[str, ...]
    check: Check
    validate: Callable[[Mapping[str, Any]], None] | None = None  # checks across kwargs


# instruction id -> checker; filled by @checker below, one entry per official IFEval id
CHECKERS: dict[str, Checker] = {}


def checker(
    instruction_id: str,
    *params: str,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[Check], Check]:
    """Register ``fn(response, kwargs, tools) -> bool`` as the checker of ``instruction_id``."""

    def register(fn: Check) -> Check:
        unknown = [p for p in params if p not in KWARGS]
        if unknown or instruction_id in CHECKERS:
            raise ValueError(f"bad checker registration {instruction_id!r}: {unknown}")
        CHECKERS[instruction_id] = Checker(instruction_id, params, fn, validate)
        return fn

    return register


def _compare(relation: str, actual: int, threshold: int) -> bool:
    return RELATIONS[relation](actual, threshold)


@checker("keywords:existence", "keywords")
def _keywords_exist(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    # the keywords are searched as regular expressions, anywhere, ignoring case
    return all(re.search(k, response, flags=re.IGNORECASE) for k in kw["keywords"])


@checker("keywords:frequency", "keyword", "frequency", "relation")
def _keyword_frequency(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    found = re.findall(kw["keyword"].strip(), response, flags=re.IGNORECASE)
    return _compare(kw["relation"], len(found), kw["frequency"])


@checker("keywords:forbidden_words", "forbidden_words")
def _forbidden_words(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return not any(
        re.search(rf"\b{word}\b", response, flags=re.IGNORECASE) for word in kw["forbidden_words"]
    )


@checker("keywords:letter_frequency", "letter", "let_frequency", "let_relation")
def _letter_frequency(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    count = response.lower().count(kw["letter"].lower())
    return _compare(kw["let_relation"], count, kw["let_frequency"])


@checker("language:response_language", "language")
def _response_language(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    language = tools.detect_language(response)
    # undetectable text (digits, symbols) counts as followed, as in the reference
    return language is None or language == kw["language"]


@checker("length_constraints:number_sentences", "num_sentences", "relation")
def _number_sentences(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return _compare(kw["relation"], tools.count_sentences(response), kw["num_sentences"])


@checker("length_constraints:number_paragraphs", "num_paragraphs")
def _number_paragraphs(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    # paragraphs are separated by the markdown divider ***; an empty one is allowed only at
    # either end (a leading or trailing divider), anywhere else it fails the instruction
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    inner = paragraphs[1:-1]
    if any(not p.strip() for p in inner):
        return False
    count = sum(1 for p in paragraphs if p.strip())
    return count == kw["num_paragraphs"]


@checker("length_constraints:number_words", "num_words", "relation")
def _number_words(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return _compare(kw["relation"], tools.count_words(response), kw["num_words"])


def _nth_within(kw: Mapping[str, Any]) -> None:
    if kw["nth_paragraph"] > kw["num_paragraphs"]:
        raise ValueError(
            f"nth_paragraph {kw['nth_paragraph']} is past num_paragraphs {kw['num_paragraphs']}"
        )


@checker(
    "length_constraints:nth_paragraph_first_word",
    "num_paragraphs",
    "nth_paragraph",
    "first_word",
    validate=_nth_within,
)
def _nth_paragraph_first_word(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    nth = kw["nth_paragraph"]
    # the reference counts only non-empty paragraphs but indexes the list with empty ones in
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    # the first word ends at the first of these punctuation marks; lowered letter by letter
    # as upstream ("Σ" stays "σ" at a word's end, where str.lower would make it "ς")
    first = "".join(c.lower() for c in itertools.takewhile(lambda c: c not in ".,?!'\"", word))
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


@checker("detectable_content:number_placeholders", "num_placeholders")
def _placeholders(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= kw["num_placeholders"]


@checker("detectable_content:postscript", "postscript_marker")
def _postscript(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    marker = kw["postscript_marker"].strip()
    # the two markers IFEval uses also match with spaces after their dots ("P. S.")
    pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}.get(
        marker, r"\s*" + marker.lower() + r".*$"
    )
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


@checker("detectable_format:number_bullet_lists", "num_bullets")
def _bullet_lists(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    # "* item" (not "**bold**") and "- item" lines; \s* may span blank lines, as upstream
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


@checker("detectable_format:constrained_response")
def _constrained_response(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return any(option in response for option in CONSTRAINED_RESPONSES)


@checker("detectable_format:number_highlighted_sections", "num_highlights")
def _highlighted_sections(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    # *x* and **x** within a line; **x** counts once, from the second pattern (the first
    # finds only its empty "**" ends)
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


@checker("detectable_format:multiple_sections", "section_spliter", "num_sections")
def _multiple_sections(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    splitter = r"\s?" + kw["section_spliter"].strip() + r"\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= kw["num_sections"]


@checker("detectable_format:json_format")
def _json_format(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    text = response.strip()
    # one fence may wrap the JSON; the prefixes come off in this order, each at most once
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@checker("detectable_format:title")
def _title(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


@checker("combination:two_responses")
def _two_responses(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    parts = response.split("******")
    # an empty part is allowed only before the first or after the last separator
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@checker("combination:repeat_prompt", "prompt_to_repeat")
def _repeat_prompt(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


@checker("startend:end_checker", "end_phrase")
def _end_phrase(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return response.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


@checker("change_case:capital_word_frequency", "capital_frequency", "capital_relation")
def _capital_words(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    capitals = sum(1 for word in tools.word_tokens(response) if word.isupper())
    return _compare(kw["capital_relation"], capitals, kw["capital_frequency"])


@checker("change_case:english_capital")
def _english_capital(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    if not response.isupper():
        return False
    language = tools.detect_language(response)
    return language is None or language == "en"  # undetectable counts as followed


@checker("change_case:english_lowercase")
def _english_lowercase(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    if not response.islower():
        return False
    language = tools.detect_language(response)
    return language is None or language == "en"  # undetectable counts as followed


@checker("punctuation:no_comma")
def _no_comma(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    return "," not in response


@checker("startend:quotation")
def _quotation(response: str, kw: Mapping[str, Any], tools: TextTools) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Instruction:
    """One instruction of a prompt: its id and its kwargs, falsy values dropped."""

    id: str
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class IFEvalRecord:
    """One prompt of an IFEval file and the instructions its reply is checked against."""

    key: Any  # as in the file: google/IFEval's are ints
    prompt: str
    instructions: tuple[Instruction, ...]

    @property
    def instruction_id_list(self) -> list[str]:
        return [i.id for i in self.instructions]


def _nearest_ids(instruction_id: str) -> list[str]:
    return difflib.get_close_matches(instruction_id, sorted(CHECKERS), n=3, cutoff=0.0)


def parse_instruction(instruction_id: Any, kwargs: Any) -> Instruction:
    """Check one instruction id and its kwargs; ``ValueError`` saying what is wrong.

    As the reference does, kwargs with falsy values (``None``, ``0``, ``""``, ``[]``) are
    dropped first, so google/IFEval's null-valued entries for other instructions' arguments
    are accepted; a name that no instruction takes is refused even when null (a typo).
    """
    if not isinstance(instruction_id, str) or instruction_id not in CHECKERS:
        raise ValueError(
            f"unknown instruction id {instruction_id!r}; nearest valid ids: "
            + ", ".join(_nearest_ids(str(instruction_id)))
        )
    spec = CHECKERS[instruction_id]
    if not isinstance(kwargs, dict):
        raise ValueError(f"{instruction_id}: kwargs must be an object, got {kwargs!r}")
    unknown = sorted(k for k in kwargs if k not in KWARGS)
    if unknown:
        raise ValueError(f"{instruction_id}: unknown kwargs {unknown}; it takes {spec.params}")
    given = {k: v for k, v in kwargs.items() if v}
    extra = sorted(k for k in given if k not in spec.params)
    if extra:
        raise ValueError(f"{instruction_id}: takes {list(spec.params)}, not {extra}")
    missing = [p for p in spec.params if p not in given]
    if missing:
        raise ValueError(
            f"{instruction_id}: missing kwargs {missing} (null, 0 and empty values count as "
            "missing, as in IFEval)"
        )
    for name, value in given.items():
        try:
            KWARGS[name](value)
        except ValueError as e:
            raise ValueError(f"{instruction_id}: kwarg {name} {e}") from None
    if spec.validate is not None:
        try:
            spec.validate(given)
        except ValueError as e:
            raise ValueError(f"{instruction_id}: {e}") from None
    return Instruction(instruction_id, MappingProxyType(given))


def parse_record(obj: Any) -> IFEvalRecord:
    """One IFEval record from its decoded JSON; ``ValueError`` saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in obj]
    if missing:
        raise ValueError(f"missing {missing}")
    ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
    if not isinstance(obj["prompt"], str):
        raise ValueError(f"prompt must be a string, got {obj['prompt']!r}")
    if not isinstance(ids, list) or not isinstance(kwargs, list):
        raise ValueError("instruction_id_list and kwargs must be lists")
    if len(ids) != len(kwargs):
        raise ValueError(f"instruction_id_list has {len(ids)} entries but kwargs has {len(kwargs)}")
    instructions = tuple(parse_instruction(i, k) for i, k in zip(ids, kwargs, strict=True))
    return IFEvalRecord(obj["key"], obj["prompt"], instructions)


_KEY_IN_TEXT = re.compile(r'"key"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def load_records(path: str | Path) -> list[IFEvalRecord]:
    """The records of an IFEval JSONL file, in file order; blank lines are skipped and an
    empty file gives ``[]``. ``ValueError`` naming ``file:line`` and the key for a broken
    line, an unknown instruction id, kwargs that do not fit, or a repeated key."""
    records: list[IFEvalRecord] = []
    lines_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                found = _KEY_IN_TEXT.search(line)
                key = f"key {found.group(1)}" if found else "key unknown"
                raise ValueError(f"{where} ({key}): not valid JSON: {e}") from None
            key = obj.get("key", "<missing>") if isinstance(obj, dict) else "<none>"
            try:
                record = parse_record(obj)
            except ValueError as e:
                raise ValueError(f"{where} (key {key!r}): {e}") from None
            # ids pair prompts across jobs and cached base scores, so they must be unique
            if str(record.key) in lines_of:
                raise ValueError(
                    f"{where} (key {key!r}): key repeats line {lines_of[str(record.key)]}"
                )
            lines_of[str(record.key)] = lineno
            records.append(record)
    return records


def select_subset(
    records: Sequence[IFEvalRecord], size: int | None, seed: int
) -> list[IFEvalRecord]:
    """``size`` records chosen by ``seed``, in file order; all of them when ``size`` is None
    or not smaller than the file.

    Each record is ranked by the SHA-256 of ``"<seed>:<key>"``, so the choice depends only on
    the seed and the keys: the same on every machine and Python version, and a larger subset
    contains every smaller one of the same seed.
    """
    if size is None or size >= len(records):
        return list(records)
    if size < 1:
        raise ValueError(f"eval.ifeval.subset must be at least 1, got {size}")

    def rank(i: int) -> str:
        return hashlib.sha256(f"{seed}:{records[i].key}".encode()).hexdigest()

    chosen = sorted(sorted(range(len(records)), key=rank)[:size])
    return [records[i] for i in chosen]


# ---------------------------------------------------------------------------------------------
# Scoring


def loose_variants(response: str) -> list[str]:
    """IFEval's eight loose readings of a reply: as it is, without its first line, its last
    line or both, each also with every ``*`` removed (markdown emphasis)."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [t.replace("*", "") for t in trimmed]


def follows(instruction: Instruction, response: str, tools: TextTools) -> bool:
    """Whether ``response`` follows one instruction, strictly; an empty or all-whitespace
    response follows none."""
    if not response.strip():
        return False
    return CHECKERS[instruction.id].check(response, instruction.kwargs, tools)


@dataclass(frozen=True)
class Followed:
    """Per-instruction verdicts for one reply."""

    strict: list[bool]
    loose: list[bool]


def score_reply(record: IFEvalRecord, response: str, tools: TextTools) -> Followed:
    """The strict and loose verdict of every instruction of ``record`` on ``response``."""
    variants = loose_variants(response)
    strict = [follows(i, response, tools) for i in record.instructions]
    loose = [any(follows(i, v, tools) for v in variants) for i in record.instructions]
    return Followed(strict, loose)


def ifeval_scores(followed: Sequence[Followed]) -> dict[str, Score]:
    """IFEval's four figures as per-prompt ratios: a prompt-level figure counts a prompt when
    all its instructions are followed (den 1); an instruction-level one counts instructions."""
    scores: dict[str, Score] = {}
    for level in ("strict", "loose"):
        verdicts = [getattr(f, level) for f in followed]
        scores[f"prompt_{level}"] = Score([float(all(v)) for v in verdicts], [1.0] * len(verdicts))
        scores[f"inst_{level}"] = Score(
            [float(sum(v)) for v in verdicts], [float(len(v)) for v in verdicts]
        )
    return {name: scores[name] for name in FIGURES}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The suite


@register_suite
class IFEvalSuite(Suite):
    """IFEval's four figures on ``eval.ifeval.path`` (default: the shipped set), headline
    prompt-level strict accuracy."""

    name = "ifeval"

    def __init__(self, cfg: Any, shipped_set: Path = SHIPPED_SET) -> None:
        super().__init__(cfg)
        self.shipped_set = shipped_set  # the records read when eval.ifeval.path is not set

    def path(self) -> Path:
        """The record file; ``FileNotFoundError`` saying how to get one when it is missing."""
        configured = self.cfg.ifeval.path
        path = Path(configured) if configured else self.shipped_set
        if not path.is_file():
            how = (
                "set eval.ifeval.path to an IFEval JSONL file"
                if configured
                else "generate it with scripts/make_ifeval_set.py, or set eval.ifeval.path "
                "to an IFEval JSONL file such as google/IFEval's input_data.jsonl"
            )
            raise FileNotFoundError(f"IFEval records not found at {path}: {how}")
        return path

    def fingerprint(self) -> dict[str, Any]:
        subset = self.cfg.ifeval.subset
        return {
            "sha256": file_sha256(self.path()),
            "subset": subset,
            # the seed changes nothing when every prompt is used
            "subset_seed": self.cfg.ifeval.subset_seed if subset is not None else None,
            # Punkt with and without its English parameters count sentences differently
            "sentence_splitter": sentence_splitter(),
        }

    def run(self, ctx: EvalContext) -> SuiteResult:
        path = self.path()
        records = load_records(path)
        subset, seed = self.cfg.ifeval.subset, self.cfg.ifeval.subset_seed
        info: dict[str, Any] = {
            "path": str(path),
            "sha256": file_sha256(path),
            "prompts_in_file": len(records),
            "subset": subset,
            "subset_seed": seed,
            "sentence_splitter": sentence_splitter(),
        }
        if not records:
            info.update(prompts=0, skipped=f"{path} has no IFEval records")
            empty = {name: Score([], []) for name in FIGURES}
            return SuiteResult(self.name, [], empty, "prompt_strict", info=info)
        chosen = select_subset(records, subset, seed)
        conversations = [
            to_messages({"instruction": r.prompt, "input": ""}, ctx.template) for r in chosen
        ]
        replies = ctx.generate(conversations)
        if len(replies) != len(chosen):
            raise RuntimeError(f"generate returned {len(replies)} replies for {len(chosen)}")
        tools = TextTools.load()
        followed = [score_reply(r, reply, tools) for r, reply in zip(chosen, replies, strict=True)]
        rows = [
            {
                "key": r.key,
                "prompt": r.prompt,
                "reply": reply,
                "instruction_id_list": r.instruction_id_list,
                "followed_strict": f.strict,
                "followed_loose": f.loose,
            }
            for r, reply, f in zip(chosen, replies, followed, strict=True)
        ]
        info.update(prompts=len(chosen), sentence_splitter=tools.splitter)
        return SuiteResult(
            suite=self.name,
            ids=[str(r.key) for r in chosen],
            scores=ifeval_scores(followed),
            headline="prompt_strict",
            rows=rows,
            info=info,
        )
