"""VQA accuracy as the official VQA evaluation computes it, plus the exact-match and choice scores of the other
VQA-style benchmarks.

Normalisation of a predicted answer (the official rules, in their order):
  1. newlines/tabs -> spaces, strip;
  2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it touches a space in the
     answer or the answer has a digit,digit comma (1,000), and replaced by a space otherwise; then periods not
     followed by a digit are deleted (3.5 keeps its point);
  3. lower-case, split on whitespace, number words zero..ten (and 'none') -> digits, articles a/an/the dropped;
  4. contractions written without apostrophes get them back (dont -> don't, youre -> you're).
Ground-truth answers are compared as released, except that when a question's answers disagree each gets step 2,
as the official script does. Score of one question: for each of the 10 answers left out in turn, min(#matches
among the other 9 / 3, 1); the 10 values are averaged. The official script's one inverted table entry is kept
(`somebody'd` -> `somebodyd`); its upper-case `I`-contractions never match lower-cased text, so they are absent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, quirk included: any '.' not before a digit
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions the official table restores; each is reached from every spelling with one apostrophe missing.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for full in _CONTRACTED:
        for i, c in enumerate(full):
            if c == "'":
                table[full[:i] + full[i + 1 :]] = full
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    out = text
    delete = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)  # the official call passes re.UNICODE (32) as the count


def process_digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official VQA evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(answer))


def normalize_answer_zh(answer: str) -> str:
    """Chinese answers: lower-cased, whitespace and punctuation removed (a 'yes' is 是 whether or not it ends in 。)."""
    return "".join(c for c in answer.lower() if unicodedata.category(c)[0] not in "PZ" and not c.isspace())


def normalize(answer: str, lang: str = "en") -> str:
    return normalize_answer_zh(answer) if lang == "zh" else normalize_answer(answer)


def vqa_accuracy(prediction: str, answers: Sequence[str], lang: str = "en") -> float:
    """One question's VQA accuracy in [0, 1] (see the module docstring); `answers` are the annotators' answers."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    pred = normalize(prediction, lang)
    if lang == "zh":
        gts = [normalize_answer_zh(a) for a in answers]
    else:
        gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def exact_match(prediction: str, answer: str, lang: str = "en") -> bool:
    """GQA (and the synthetic set): both sides normalised, then equal."""
    return normalize(prediction, lang) == normalize(answer, lang)


UNANSWERABLE = "unanswerable"
_ABSTAIN = re.compile(
    r"^(unanswerable|unknown|not answerable|cannot (be )?answer(ed)?|can ?not tell|can't tell|"
    r"i (do not|don't) know|not sure|unclear|unsuitable( image)?|no answer)$"
)


def vizwiz_answer(prediction: str) -> str:
    """VizWiz: an abstention in other words ('unknown', "can't tell", ...) becomes the dataset's 'unanswerable'."""
    return UNANSWERABLE if _ABSTAIN.match(normalize_answer(prediction)) else prediction


def mean(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")
