"""Evaluation metrics against pycocoevalcap and hand-computed values."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from ziya_jax.evaluate import captioning, grounding, retrieval, text, vqa

needs_java = pytest.mark.skipif(not text.java_available(), reason="the Stanford PTB tokenizer needs Java")

REFS = {
    "1": ["A man riding a brown horse on a beach.", "A person on horseback near the sea.", "A man rides a horse."],
    "2": ["Two dogs playing in the snow.", "A pair of dogs run through snow!", "Dogs in the snow."],
    "3": ["A red lobster on a white plate.", "Cooked lobster served on a dish.", "A plate with a lobster (red)."],
    "4": ["The U.S. flag flying at 10:30 p.m.", "A flag that isn't moving.", "An American flag on a pole."],
}
PREDS = {
    "1": "A man is riding a horse on the beach.",
    "2": "Two dogs run in the snow.",
    "3": "A lobster on a plate.",
    "4": "A flag on a pole.",
}
# Caption-like sentences on which the Python PTB equivalent must agree with the jar token for token.
PTB_CASES = [
    "A man's dog (brown) isn't running.",
    'Two dogs, "happy" and wet; play-fighting!',
    "It's 3.5 km/h -- fast... right?",
    "The U.S. flag & a $5 bill at 10:30 p.m.",
    "She said 'hello' to Mr. Smith's cat.",
    "cannot gonna don't won't I'm you're they'll we've he'd",
    "A {curly} [square] tag #1 50% off*",
    "Ends with etc.",
    "e-mail co-op 1,000 people   extra   spaces",
    "Résumé café naïve",
    "a\ttab",
    "''quoted'' ``x``",
    "A B. C",
    "dogs' bones",
    'he said: "no".',
    "A woman (left) holds an umbrella; it's raining!",
    "An old-fashioned clock tower at 5 o'clock.",
    "Kids' bikes parked outside.",
    "What's that? I don't know!",
    "a man in a t-shirt",
    "Mt. Fuji at dawn",
    "There are 4 objects: a small red circle at the top left, a large blue square at the center and a medium "
    "green cross at the bottom right.",
    "A.",
    "...",
]


def _coco_reference(refs, preds, tokenize):
    """The COCO caption evaluation's own pipeline: tokenise, then pycocoevalcap's Cider and Bleu."""
    gts = {k: [tokenize(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize(preds[k])] for k in refs}
    return 100 * Cider().compute_score(gts, res)[0], 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3]


@needs_java
def test_cider_equals_pycocoevalcap_with_its_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": p}] for k, p in PREDS.items()})
    want_cider = 100 * Cider().compute_score(gts, res)[0]
    want_bleu = 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    got = captioning.caption_scores(REFS, PREDS, "en", en_tokenizer="java")
    assert got["CIDEr"] == pytest.approx(want_cider, abs=1e-9) and want_cider > 10
    assert got["BLEU-4"] == pytest.approx(want_bleu, abs=1e-9)
    assert got["tokenization"].startswith("java: PTB")
    # The Python tokenisation gives the same numbers on these captions.
    py = captioning.caption_scores(REFS, PREDS, "en", en_tokenizer="python")
    assert py["CIDEr"] == pytest.approx(want_cider, abs=1e-9)


def test_cider_python_tokenizer_and_chinese_match_pycocoevalcap():
    cider, bleu = _coco_reference(REFS, PREDS, text.ptb_tokenize_python)
    got = captioning.caption_scores(REFS, PREDS, "en", en_tokenizer="python")
    assert (got["CIDEr"], got["BLEU-4"]) == pytest.approx((cider, bleu), abs=1e-9)
    zh_refs = {
        "a": ["一只狗在草地上奔跑。", "草地上有一只棕色的狗"],
        "b": ["一个男人骑着摩托车。", "男子在路上骑摩托车"],
        "c": ["桌子上放着一盘食物", "一盘食物在桌子上。"],
    }
    zh_preds = {"a": "一只狗在草地上", "b": "一个男人骑摩托车。", "c": "一盘水果"}
    cider, bleu = _coco_reference(zh_refs, zh_preds, text.jieba_tokenize)
    got = captioning.caption_scores(zh_refs, zh_preds, "zh")
    assert (got["CIDEr"], got["BLEU-4"]) == pytest.approx((cider, bleu), abs=1e-9)
    assert got["CIDEr"] > 0 and "jieba" in got["tokenization"]


def test_caption_scores_rank_and_validate():
    good = captioning.caption_scores(REFS, PREDS, "en", en_tokenizer="python")["CIDEr"]
    shuffled = dict(zip(PREDS, list(PREDS.values())[1:] + list(PREDS.values())[:1]))
    assert captioning.caption_scores(REFS, shuffled, "en", en_tokenizer="python")["CIDEr"] < good / 3
    empty = captioning.caption_scores(REFS, {k: "" for k in PREDS}, "en", en_tokenizer="python")
    assert empty["CIDEr"] == 0.0
    with pytest.raises(ValueError, match="same ids"):
        captioning.caption_scores(REFS, {"1": "x"}, "en")
    with pytest.raises(ValueError, match="METEOR"):
        captioning.caption_scores(REFS, PREDS, "zh", meteor=True)


def test_python_ptb_rules():
    cases = {
        "A man's dog (brown) isn't running.": "a man 's dog -lrb- brown -rrb- is n't running",
        "The U.S. flag & a $5 bill at 10:30 p.m.": "the u.s. flag & a $ 5 bill at 10:30 p.m.",
        "cannot gonna won't": "can not gon na wo n't",
        'He said: "no"... OK?': "he said no ok",
        "Kids' bikes, e-mail, 1,000 people": "kids bikes e-mail 1,000 people",
        "Ends with etc.": "ends with etc.",
    }
    for sentence, want in cases.items():
        assert text.ptb_tokenize_python(sentence) == want, sentence


@needs_java
def test_python_ptb_equals_the_jar():
    assert [text.ptb_tokenize_python(s) for s in PTB_CASES] == text.ptb_tokenize_java(PTB_CASES)


def test_tokenizer_choice_without_java(monkeypatch):
    monkeypatch.setattr(text.shutil, "which", lambda name: None)
    assert text.resolve_en_tokenizer("auto") == "python"
    with pytest.raises(ValueError, match="not on PATH"):
        text.resolve_en_tokenizer("java")
    with pytest.raises(ValueError, match="choose"):
        text.resolve_en_tokenizer("spacy")


def test_jieba_segmentation_convention():
    assert text.jieba_tokenize("图中有3个物体：左上是一个红色圆形。") == "图中 有 3 个 物体 左上 是 一个 红色 圆形"
    assert text.jieba_tokenize("  ABC 狗！") == "abc 狗"


# --- VQA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Yes.", "yes"),  # period not before a digit is deleted, lower-cased
        ("3.5", "3.5"),  # a decimal point stays
        ("red, white", "red white"),  # ',' touching a space is deleted
        ("red,white", "red white"),  # ... otherwise replaced by a space
        ("1,000", "1000"),  # a digit,digit comma: punctuation deleted
        ("t-shirt", "t shirt"),  # '-' not touching a space -> space
        ("left - right", "left right"),  # '-' touching a space -> deleted
        ("(a) dog!", "dog"),  # brackets and '!' removed, article dropped
        ("Two dogs", "2 dogs"),  # number words -> digits
        ("none", "0"),
        ("The cat and an apple", "cat and apple"),  # articles a/an/the dropped
        ("dont know", "don't know"),  # contractions restored
        ("youre right", "you're right"),
        ("couldnt've", "couldn't've"),
        ("somebody'd", "somebodyd"),  # the official table's inverted entry
        ("im here", "im here"),  # the I-contractions never match lower-cased text
        ("  a\tb\nc ", "b c"),  # whitespace; the article 'a' dropped
        ("50/50", "50 50"),
    ],
)
def test_vqa_normalisation(raw, want):
    assert vqa.normalize_answer(raw) == want


@pytest.mark.parametrize("matches, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_score(matches, want):
    # k of 10 answers match. Leaving out a matching answer leaves k-1, a non-matching one k:
    # 1 -> 9/10 * 1/3 = 0.3; 2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 3 -> (3 * 2/3 + 7) / 10 = 0.9; 4 -> 1.
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa.vqa_accuracy("Cat.", answers) == pytest.approx(want)


def test_vqa_ground_truth_processing():
    # Answers that agree are compared as released: the prediction is normalised, they are not.
    assert vqa.vqa_accuracy("Yes!", ["yes"] * 10) == 1.0
    assert vqa.vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    # Answers that disagree get the punctuation step (but not the number/article step).
    assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("2", ["two"] * 5 + ["2"] * 5) == 1.0
    assert vqa.vqa_accuracy("2", ["two"] * 9 + ["2"]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        vqa.vqa_accuracy("x", [])


def test_exact_match_vizwiz_and_chinese():
    assert vqa.exact_match("The dog.", "dog") and not vqa.exact_match("dogs", "dog")
    assert vqa.exact_match("是。", "是", "zh") and vqa.exact_match(" 红 色 ", "红色", "zh")
    assert not vqa.exact_match("否", "是", "zh")
    for abstain in ("I don't know.", "Unknown", "cannot answer", "Unanswerable", "can't tell"):
        assert vqa.vizwiz_answer(abstain) == "unanswerable", abstain
    assert vqa.vizwiz_answer("tomato soup") == "tomato soup"
    answers = ["unanswerable"] * 7 + ["unsuitable"] * 3
    assert vqa.vqa_accuracy(vqa.vizwiz_answer("I don't know"), answers) == 1.0


# --- retrieval ---------------------------------------------------------------------------------------------


def test_recall_on_constructed_similarity():
    # 3 images, 6 texts (texts 2i and 2i+1 describe image i).
    text_image = [0, 0, 1, 1, 2, 2]
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: own text first          -> TR rank 0
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2],  # image 1: best own text (0.5) 3rd -> TR rank 2
            [0.0, 0.0, 0.1, 0.0, 0.35, 0.2],  # image 2: own text first          -> TR rank 0
        ]
    )
    got = retrieval.recall_at_k(sim, text_image, ks=(1, 2, 3))
    assert got["TR@1"] == pytest.approx(200 / 3) and got["TR@2"] == pytest.approx(200 / 3)
    assert got["TR@3"] == 100.0
    # Columns: text 0 -> image 0 ranked 1st; text 1 -> image 1 (0.6) beats image 0 -> 2nd; text 2 -> image 0 (0.8)
    # beats image 1 (0.5) -> 2nd; text 3 -> 1st; text 4 -> 1st; text 5 -> 2nd (its 0.2 ties image 1's: a tie
    # counts against the model).
    assert got["IR@1"] == pytest.approx(300 / 6) and got["IR@2"] == 100.0
    assert got["R_mean"] == pytest.approx(np.mean([200 / 3, 200 / 3, 100, 50, 100, 100]))


def test_recall_ties_count_against_the_model():
    got = retrieval.recall_at_k(np.zeros((4, 4)), [0, 1, 2, 3], ks=(1, 3, 4))
    assert got["TR@1"] == got["IR@1"] == got["TR@3"] == 0.0 and got["TR@4"] == got["IR@4"] == 100.0
    assert retrieval.recall_at_k(np.eye(4), [0, 1, 2, 3], ks=(1,))["IR@1"] == 100.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval.recall_at_k(np.eye(3), [0, 1, 5])
    with pytest.raises(ValueError, match="at least one text"):
        retrieval.recall_at_k(np.eye(3), [0, 1, 1])


def test_itm_rerank_reorders_only_the_top_k():
    sim = np.array([[0.5, 0.6, 0.1], [0.4, 0.3, 0.2], [0.0, 0.1, 0.35]])
    text_image = [0, 1, 2]
    assert retrieval.recall_at_k(sim, text_image, ks=(1,))["TR@1"] == pytest.approx(100 / 3)
    match = np.eye(3) * 10  # an ITM that knows the pairs
    i2t, t2i = retrieval.rerank(sim, 2, lambda i, t: match[i, t])
    got = retrieval.recall_reranked(i2t, t2i, text_image, ks=(1,))
    assert got["TR@1"] == 100.0 and got["IR@1"] == 100.0
    # With top_k=1 each query keeps its ITC-best candidate first: the same as ITC alone.
    i2t, t2i = retrieval.rerank(sim, 1, lambda i, t: match[i, t])
    assert retrieval.recall_reranked(i2t, t2i, text_image, ks=(1,)) == retrieval.recall_at_k(sim, text_image, ks=(1,))


# --- grounding ---------------------------------------------------------------------------------------------


def test_iou_and_grounding_hits():
    assert grounding.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert grounding.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert grounding.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    ref = (100, 100, 300, 300)
    assert grounding.grounding_hit("It is at [110,100,300,310].", ref)  # IoU 0.905
    assert not grounding.grounding_hit("[200,100,400,300]", ref)  # IoU 1/3
    assert grounding.grounding_hit("[100,100,300,300] or [0,0,10,10]", ref)  # the first box counts
    assert not grounding.grounding_hit("[0,0,10,10] then [100,100,300,300]", ref)
    assert not grounding.grounding_hit("no box here", ref)
    assert grounding.first_box("[300,0,100,50] [1,2,3,4]") == (1, 2, 3, 4)  # malformed boxes are skipped
