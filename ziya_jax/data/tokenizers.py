"""Tokenizers: sentencepiece for the LLM, BERT WordPiece (or sentencepiece for the demo) for the Q-Former.

The LLM tokenizer is a sentencepiece model plus the tokens a Hugging Face checkpoint adds on top of it
(`added_tokens.json` beside `tokenizer.model`, e.g. `<human>`/`<bot>`); text is split on those tokens and
the rest goes through sentencepiece. The demo tokenizers are trained here with identity normalisation, no
dummy prefix and byte fallback, so any text (Chinese included) decodes back to exactly itself and
concatenating encodings of pieces of a text decodes to the whole text.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

ZIYA_ROLE_TOKENS = ("<human>", "<bot>")
WORD_BOUNDARY = "\x1f"  # the ASCII unit separator: marks Chinese word boundaries in training text, never in real text
# Ideographs plus CJK and full-width punctuation (formats' language test needs ideographs only).
_CJK_OR_FULLWIDTH = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
QFORMER_SPECIALS = ("[CLS]", "[SEP]", "[DEC]")


class SentencePieceTokenizer:
    """A sentencepiece model plus added tokens {text: id}; picklable (Grain workers receive a copy)."""

    def __init__(self, model_proto: bytes, added_tokens: Mapping[str, int] | None = None, name: str = ""):
        self.name = name or "sentencepiece model"
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.added_tokens = dict(added_tokens or {})
        self._added_by_id = {i: t for t, i in self.added_tokens.items()}
        # Longest first, so an added token that contains another wins.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """`path` is a tokenizer.model file or a folder holding one; `added_tokens.json` beside it is used."""
        path = os.fspath(path)
        model = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(model):
            raise FileNotFoundError(f"sentencepiece model {model} not found")
        with open(model, "rb") as f:
            proto = f.read()
        added_file = os.path.join(os.path.dirname(model), "added_tokens.json")
        added = {}
        if os.path.isfile(added_file):
            with open(added_file, encoding="utf-8") as f:
                added = json.load(f)
            bad = {k: v for k, v in added.items() if not isinstance(v, int) or v < 0}
            if bad:
                raise ValueError(f"{added_file}: added token ids must be non-negative ints, got {bad}")
        try:
            return cls(proto, added, name=model)
        except RuntimeError as e:
            raise ValueError(f"{model} is not a sentencepiece model: {e}") from None

    def __getstate__(self):
        return {"proto": self._proto, "added_tokens": self.added_tokens, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["added_tokens"], state["name"])

    def serialized(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return max([self._sp.get_piece_size() - 1, *self._added_by_id]) + 1

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def has_pad(self) -> bool:
        return self._sp.pad_id() >= 0

    @property
    def pad_id(self) -> int:
        """The model's pad id, or EOS when it has none (Ziya pads with EOS)."""
        return self._sp.pad_id() if self.has_pad else self.eos_id

    def piece_id(self, piece: str) -> int:
        """Id of a whole piece or added token; KeyError if the vocabulary has no such piece."""
        if piece in self.added_tokens:
            return self.added_tokens[piece]
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"{piece!r} is not a piece of {self.name}")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids, no BOS/EOS."""
        if self._split is None:
            return self._sp.encode(text)
        ids = []
        for part in self._split.split(text):
            if part in self.added_tokens:
                ids.append(self.added_tokens[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i in self._added_by_id:
                out.append(self._sp.decode(run))
                out.append(self._added_by_id[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


class QFormerTokenizer:
    """The Q-Former's text tokenizer: a backend's plain `encode` plus the ids of [CLS], [SEP], [PAD] and
    [DEC]. Every text is `[CLS] body [SEP]`; ITG (stage 1) replaces the [CLS] by [DEC], as BLIP-2 does with
    bert-base-uncased + an added `[DEC]` bos token (id 30522, hence the Q-Former vocabulary of 30523)."""

    def __init__(self, backend, cls_id: int, sep_id: int, pad_id: int, dec_id: int, vocab_size: int):
        self.backend = backend
        self.cls_id, self.sep_id, self.pad_id, self.dec_id = cls_id, sep_id, pad_id, dec_id
        self.vocab_size = vocab_size

    @classmethod
    def from_bert_vocab(cls, vocab_file: str | os.PathLike, lowercase: bool = True) -> "QFormerTokenizer":
        """A converted checkpoint's BERT `vocab.txt`, read by the `tokenizers` library's WordPiece."""
        from tokenizers import BertWordPieceTokenizer

        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"BERT vocabulary {vocab_file} not found")
        with open(vocab_file, encoding="utf-8") as f:
            entries = {line.rstrip("\n") for line in f}
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in entries]
        if missing:
            raise ValueError(f"{vocab_file} lacks the special tokens {missing}")
        tok = BertWordPieceTokenizer(vocab_file, lowercase=lowercase)
        if tok.token_to_id("[DEC]") is None:
            tok.add_special_tokens(["[DEC]"])
        ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[DEC]")}
        return cls(
            _BertBackend(tok),
            ids["[CLS]"],
            ids["[SEP]"],
            ids["[PAD]"],
            ids["[DEC]"],
            tok.get_vocab_size(with_added_tokens=True),
        )

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike) -> "QFormerTokenizer":
        """A sentencepiece model trained with [CLS]/[SEP]/[DEC] as user symbols and a pad id (the demo's)."""
        sp = SentencePieceTokenizer.load(path)
        try:
            cls_id, sep_id, dec_id = (sp.piece_id(t) for t in QFORMER_SPECIALS)
        except KeyError as e:
            raise ValueError(
                f"{path}: a Q-Former sentencepiece model needs the pieces {QFORMER_SPECIALS}: {e}"
            ) from None
        if not sp.has_pad:
            raise ValueError(f"{path}: a Q-Former sentencepiece model needs a pad id")
        return cls(sp, cls_id, sep_id, sp.pad_id, dec_id, sp.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Body ids, without [CLS]/[SEP]."""
        return self.backend.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids])


class _BertBackend:
    """`tokenizers` WordPiece with special tokens left out of encode and dropped by decode."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@functools.lru_cache(maxsize=1)
def load_tokenizers(directory: str) -> tuple[SentencePieceTokenizer, QFormerTokenizer | None]:
    """(LLM tokenizer, Q-Former tokenizer or None) from a folder holding `llm.model` or `tokenizer.model`
    (+ added_tokens.json), and optionally `qformer.model` (sentencepiece) or `vocab.txt` (BERT)."""
    llm = next(
        (
            os.path.join(directory, n)
            for n in ("llm.model", "tokenizer.model")
            if os.path.isfile(os.path.join(directory, n))
        ),
        None,
    )
    if llm is None:
        raise FileNotFoundError(f"no llm.model or tokenizer.model in {directory}")
    qformer = None
    if os.path.isfile(os.path.join(directory, "qformer.model")):
        qformer = QFormerTokenizer.from_sentencepiece(os.path.join(directory, "qformer.model"))
    elif os.path.isfile(os.path.join(directory, "vocab.txt")):
        qformer = QFormerTokenizer.from_bert_vocab(os.path.join(directory, "vocab.txt"))
    return SentencePieceTokenizer.load(llm), qformer


TOKENIZER_FILES = ("llm.model", "tokenizer.model", "added_tokens.json", "qformer.model", "vocab.txt")


def copy_tokenizers(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files `load_tokenizers` reads from folder `src` into `dst` -> the names copied."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


def check_vocabularies(tok, qtok, cfg) -> None:
    """Token ids past a model's embedding table raise no error under jit (JAX clips or fills out-of-range
    indices), so tokenizers of another model (or left in a workdir by an older config) would run silently on
    garbage. cfg: the ModelConfig."""
    pairs = [("LLM", tok.vocab_size, "llm", cfg.llm.vocab_size)]
    if qtok is not None and cfg.qformer.text_branch:
        pairs.append(("Q-Former", qtok.vocab_size, "qformer", cfg.qformer.vocab_size))
    for name, have, section, rows in pairs:
        if have > rows:
            raise ValueError(
                f"the {name} tokenizer has {have} ids but model.{section}.vocab_size is {rows}: "
                "use the tokenizers this model was configured for"
            )


def jieba_segmenter():
    """jieba, quiet and with its dictionary loaded once (for training tokenizers and for caption metrics)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def mark_chinese_words(text: str) -> str:
    """`text` with WORD_BOUNDARY between jieba's words (dictionary only, no HMM) wherever a boundary touches a
    Chinese character or full-width punctuation; English keeps sentencepiece's own whitespace rule."""
    words = jieba_segmenter().lcut(text, HMM=False)
    marked = words[:1]
    for left, right in zip(words, words[1:]):
        if _CJK_OR_FULLWIDTH.match(left[-1]) or _CJK_OR_FULLWIDTH.match(right[0]):
            marked.append(WORD_BOUNDARY)
        marked.append(right)
    return "".join(marked)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    user_symbols: Sequence[str] = (),
    pad: bool = False,
    chinese_words: bool = False,
) -> bytes:
    """A BPE sentencepiece model (serialized proto) from `texts`, deterministically: one thread, every
    sentence in the given order. Ids: 0 unk, 1 bos, 2 eos (LLaMA's layout), then pad if asked, then
    `user_symbols`; byte fallback makes every text encodable and decodable without loss.
    chinese_words: no piece crosses a Chinese word boundary (mark_chinese_words), as in the word vocabularies
    of bilingual LLMs. Without it, BPE on templated text learns whole Chinese phrases as single pieces (one per
    question), which a model cannot compose."""
    if chinese_words:
        texts = (mark_chinese_words(t) for t in texts)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pretokenization_delimiter=WORD_BOUNDARY if chinese_words else "",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user_symbols),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3 if pad else -1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()
