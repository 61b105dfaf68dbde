"""Caption tokenisation before CIDEr/BLEU/METEOR, so scores compare with published ones.

English follows the COCO caption evaluation: Stanford's PTBTokenizer (the jar pycocoevalcap ships), lower-cased,
with the punctuation tokens pycocoevalcap drops removed. That needs Java; without it `ptb_tokenize` is a
pure-Python equivalent of the same rules for caption-like text (checked token for token against the jar in the
tests where Java is present):
  - lower-case; split on whitespace;
  - split off surrounding punctuation; brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (PTB's names, which
    survive pycocoevalcap's filter once lower-cased, as they do with the jar); `$ # % * &` become tokens;
  - split clitics: n't 's 'm 're 've 'll 'd (won't -> wo n't), and cannot/gonna/gotta/wanna -> two tokens;
  - a final period is split off unless the word is an abbreviation (u.s., p.m., single letter + period, mr. ...);
  - tokens that are only punctuation (. , ; : ! ? - -- ... quotes) are dropped.
Chinese is segmented with jieba (precise mode, HMM on); whitespace and punctuation-only tokens are dropped and
Latin letters lower-cased. `CONVENTIONS` states both, and is written beside every caption score.
"""

from __future__ import annotations

import re
import shutil
import unicodedata

from ziya_jax.data.tokenizers import jieba_segmenter

# The tokens pycocoevalcap removes after PTB tokenisation.
PTB_DROPPED = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
CONVENTIONS = {
    "en": "PTB tokenisation, lower-cased, punctuation tokens removed (pycocoevalcap)",
    "zh": "jieba 0.42 precise mode (HMM on), punctuation and whitespace tokens removed, Latin lower-cased",
}
_OPEN = {"(": "-lrb-", "[": "-lsb-", "{": "-lcb-"}
_CLOSE = {")": "-rrb-", "]": "-rsb-", "}": "-rcb-"}
_SYMBOLS = set("$#%*&")
_QUOTES = set("\"'`")
_TRAILING = set(",;:!?")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc ltd co corp prof gen col lt sgt mt ft no jan feb mar "
    "apr jun jul aug sep sept oct nov dec".split()
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na")}
_ACRONYM = re.compile(r"^([a-z]\.)+$")


def java_available() -> bool:
    return shutil.which("java") is not None


def _split_word(word: str) -> list[str]:
    """One whitespace-separated chunk (lower-cased) -> PTB tokens, punctuation included."""
    head, tail = [], []
    while word and (word[0] in _OPEN or word[0] in _QUOTES or word[0] in _SYMBOLS):
        head.append(_OPEN.get(word[0], word[0]))
        word = word[1:]
    while word:
        if word.endswith("..."):
            tail.append("...")
            word = word[:-3]
        elif word[-1] in _CLOSE:
            tail.append(_CLOSE[word[-1]])
            word = word[:-1]
        elif word[-1] in _TRAILING or word[-1] in _SYMBOLS or word[-1] == '"' or word[-1] == "`":
            tail.append(word[-1])
            word = word[:-1]
        elif word[-1] == "'" and not word.endswith("n'"):  # closing quote or plural possessive
            tail.append("'")
            word = word[:-1]
        elif word[-1] == "." and not _is_abbreviation(word):
            tail.append(".")
            word = word[:-1]
        else:
            break
    middle = []
    if word in _SPLIT_WORDS:
        middle = list(_SPLIT_WORDS[word])
    elif word:
        m = _CLITIC.match(word)
        if m and m.group(2) == "n't":
            middle = [m.group(1), "n't"]
        elif m:
            middle = [m.group(1), m.group(2)]
        else:
            middle = [word]
    return head + middle + tail[::-1]


def _is_abbreviation(word: str) -> bool:
    return bool(_ACRONYM.match(word)) or word[:-1] in _ABBREVIATIONS


def ptb_tokenize_python(text: str) -> str:
    """The pure-Python PTB equivalent (see the module docstring)."""
    tokens = [t for w in text.replace("\n", " ").lower().split() for t in _split_word(w)]
    return " ".join(t for t in tokens if t not in PTB_DROPPED and not _only_punctuation(t))


def _only_punctuation(token: str) -> bool:
    return all(c in ".-'`\"" for c in token)


def ptb_tokenize_java(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP jar, needs Java) on many texts at once."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keep = [i for i, t in enumerate(texts) if t.strip()]  # the jar drops empty lines, which would misalign
    out = [""] * len(texts)
    if keep:
        done = PTBTokenizer().tokenize({i: [{"caption": texts[i]}] for i in keep})
        for i in keep:
            out[i] = done[i][0]
    return out


def jieba_tokenize(text: str) -> str:
    """Chinese (or mixed) text -> space-joined jieba words, punctuation and whitespace dropped."""
    words = jieba_segmenter().lcut(text.lower(), cut_all=False, HMM=True)
    return " ".join(w for w in (w.strip() for w in words) if w and not all(_is_punct(c) for c in w))


def _is_punct(c: str) -> bool:
    return unicodedata.category(c)[0] in "PZ"


def resolve_en_tokenizer(choice: str = "auto") -> str:
    """'auto' -> 'java' when Java is on PATH, else 'python'; an explicit 'java' without Java is an error."""
    if choice not in ("auto", "java", "python"):
        raise ValueError(f"English tokenizer {choice!r}; choose auto, java or python")
    if choice == "java" and not java_available():
        raise ValueError("the Java PTB tokenizer was asked for, but `java` is not on PATH")
    if choice == "auto":
        return "java" if java_available() else "python"
    return choice


def tokenize(texts: list[str], lang: str, en_tokenizer: str = "auto") -> list[str]:
    """Texts of one language -> space-separated tokens as the caption metrics expect."""
    if lang == "zh":
        return [jieba_tokenize(t) for t in texts]
    if lang != "en":
        raise ValueError(f"caption language {lang!r}; known: en, zh")
    if resolve_en_tokenizer(en_tokenizer) == "java":
        return ptb_tokenize_java(texts)
    return [ptb_tokenize_python(t) for t in texts]
