"""Tokenizers: lossless bilingual round trips, deterministic training, added tokens, BERT vocab.txt."""

import copy
import itertools
import json
import re

import pytest

from ziya_jax.data import synthetic, tokenizers


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    llm_path, q_path = synthetic.train_demo_tokenizers(str(out), num_scenes=100)
    return tokenizers.SentencePieceTokenizer.load(llm_path), tokenizers.QFormerTokenizer.from_sentencepiece(q_path)


TEXTS = [
    "<human>:请简要描述这张图片。\n<bot>:图中有2个物体：左上是一个大的红色圆形，中间是一个小的蓝色正方形。",
    "<human>:What color is the object at the top left?\n<bot>:red",
    "  leading and  double  spaces, tabs\tand trailing newline\n",
    "unseen: ß ñ Ωmega 日本語のテキスト 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂 [12,345,678,999]",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_llm_round_trip_is_lossless(demo, text):
    tok, _ = demo
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_concatenated_encodings_decode_to_concatenated_text(demo):
    tok, _ = demo
    a, b = "<human>:图中有几个物体？\n<bot>:", "3"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_role_tokens_are_single_pieces_and_special_ids_follow_llama(demo):
    tok, _ = demo
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: Ziya pads with EOS
    for role in tokenizers.ZIYA_ROLE_TOKENS:
        assert tok.encode(role) == [tok.piece_id(role)]
    with pytest.raises(KeyError):
        tok.piece_id("<no such piece>")


def test_demo_pieces_stay_inside_chinese_words(demo):
    tok, _ = demo
    text = "图中有3个物体：左上是一个大的红色圆形，右下是一个小的蓝色正方形。红色正方形在哪里？"
    piece_ends = set(itertools.accumulate(len(tok.decode([i])) for i in tok.encode(text)))
    word_ends = set(
        itertools.accumulate(len(w) for w in tokenizers.mark_chinese_words(text).split(tokenizers.WORD_BOUNDARY))
    )
    assert word_ends <= piece_ends  # every word boundary is a piece boundary
    assert [tok.decode([i]) for i in tok.encode("红色正方形在哪里？")] == ["红色", "正方形", "在", "哪里", "？"]


def test_demo_tokenizers_keep_english_words_whole(tmp_path):
    """At 512 pieces the Q-Former tokenizer cut the set's English words ("large" into 5 pieces, "red" into 2)
    while it kept Chinese words whole; the demo's 640 keep both."""
    llm, q = synthetic.train_demo_tokenizers(str(tmp_path))
    toks = tokenizers.SentencePieceTokenizer.load(llm), tokenizers.QFormerTokenizer.from_sentencepiece(q)
    for text in synthetic.corpus(num_scenes=20):
        text = re.sub("|".join(tokenizers.ZIYA_ROLE_TOKENS), " ", text)
        for tok in toks:
            runs = [re.findall("[A-Za-z]+", tok.decode([i])) for i in tok.encode(text)]
            assert [r[0] for r in runs if r] == re.findall("[A-Za-z]+", text) and max(map(len, runs)) <= 1, text


def test_demo_training_is_deterministic(tmp_path):
    a = synthetic.train_demo_tokenizers(str(tmp_path / "a"), num_scenes=50)
    b = synthetic.train_demo_tokenizers(str(tmp_path / "b"), num_scenes=50)
    for pa, pb in zip(a, b):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()


def test_added_tokens_json_is_honoured(tmp_path):
    texts = synthetic.corpus(30)
    proto = tokenizers.train_sentencepiece([t.replace("<human>", "").replace("<bot>", "") for t in texts], 400)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    base = tokenizers.SentencePieceTokenizer(proto)
    added = {"<human>": base.vocab_size, "<bot>": base.vocab_size + 1}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    tok = tokenizers.SentencePieceTokenizer.load(tmp_path)
    assert tok.vocab_size == base.vocab_size + 2
    text = "<human>:你好<bot>:hi<human>"
    ids = tok.encode(text)
    assert ids[0] == added["<human>"] and ids[-1] == added["<human>"] and added["<bot>"] in ids
    assert ids[1 : ids.index(added["<bot>"])] == base.encode(":你好")
    assert tok.decode(ids) == text
    clone = copy.deepcopy(tok)  # what a Grain worker process receives
    assert clone.encode(text) == ids and clone.vocab_size == tok.vocab_size


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        tokenizers.SentencePieceTokenizer.load(tmp_path / "nothere.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        tokenizers.SentencePieceTokenizer.load(tmp_path / "junk.model")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    missing = r"\['\[CLS\]', '\[SEP\]', '\[PAD\]', '\[UNK\]'\]"
    with pytest.raises(ValueError, match=r"vocab.txt lacks the special tokens " + missing):
        tokenizers.QFormerTokenizer.from_bert_vocab(tmp_path / "vocab.txt")


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "circle", "##s", "红", "色", "."]


@pytest.mark.parametrize("with_dec", [False, True])
def test_bert_vocab_wordpiece(tmp_path, with_dec):
    vocab = VOCAB + (["[DEC]"] if with_dec else [])
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    q = tokenizers.QFormerTokenizer.from_bert_vocab(path)
    assert q.encode("The red Circles 红色.") == [
        vocab.index(t) for t in ["the", "red", "circle", "##s", "红", "色", "."]
    ]
    assert (q.cls_id, q.sep_id, q.pad_id) == (2, 3, 0)
    # BLIP-2's [DEC] is an added token after bert-base-uncased's 30522 entries (hence 30523)
    assert q.dec_id == (vocab.index("[DEC]") if with_dec else len(VOCAB))
    assert q.vocab_size == len(VOCAB) + 1
    assert q.decode([q.cls_id, *q.encode("red circles"), q.sep_id]) == "red circles"


def test_qformer_sentencepiece_specials(demo):
    _, q = demo
    ids = {q.cls_id, q.sep_id, q.dec_id, q.pad_id}
    assert len(ids) == 4 and max(ids) < q.vocab_size
    text = "What is in the region [1,2,3,4]? 区域里是什么？"
    assert q.decode(q.encode(text)) == text
    assert not ids & set(q.encode(text))
