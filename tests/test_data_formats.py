"""Task formats: Ziya prompt layout, loss mask on answers + EOS only, image placeholders, truncation, boxes."""

import numpy as np
import pytest

from ziya_jax.data import errors, formats, synthetic, tokenizers
from ziya_jax.data.formats import Conversation, Turn

Q = 4  # query tokens per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    llm_path, _ = synthetic.train_demo_tokenizers(str(tmp_path_factory.mktemp("tok")), num_scenes=60)
    return tokenizers.SentencePieceTokenizer.load(llm_path)


@pytest.fixture(scope="module")
def qtok(tmp_path_factory):
    _, q_path = synthetic.train_demo_tokenizers(str(tmp_path_factory.mktemp("qtok")), num_scenes=60)
    return tokenizers.QFormerTokenizer.from_sentencepiece(q_path)


def encode(conv, tok, max_len=160, num_images=None):
    conv = formats.place_images(
        conv,
        conv.prefix.count(formats.IMAGE) + sum(t.query.count(formats.IMAGE) for t in conv.turns)
        if num_images is None
        else num_images,
    )
    return formats.encode_conversation(conv, tok, max_len, tok.vocab_size, Q)


def runs(mask):
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def reason(excinfo):
    return excinfo.value.reason


def test_multi_turn_layout_and_loss_mask_cover_exactly_answers_and_eos(tok):
    turns = (
        Turn("图中有几个物体？", "3"),
        Turn("What color is the object at the top?", "red"),
        Turn("Where is the red circle?", "top left"),
    )
    row, images = encode(Conversation(turns), tok)
    ids, att, loss = row["input_ids"], row["attention_mask"], row["loss_mask"]
    assert ids.dtype == att.dtype == loss.dtype == np.int32 and ids.shape == (160,)
    n = int(att.sum())
    assert att[:n].all() and not att[n:].any() and (ids[n:] == tok.pad_id).all()
    assert not loss[n:].any() and images == 0
    # One masked run per turn: the answer's tokens then EOS, nothing else.
    answer_runs = runs(loss)
    assert len(answer_runs) == len(turns)
    prompt_start = 0
    for (start, end), turn in zip(answer_runs, turns):
        assert ids[end - 1] == tok.eos_id and tok.eos_id not in ids[start : end - 1]
        assert tok.decode(ids[start : end - 1]) == turn.answer
        assert tok.decode(ids[prompt_start:start]) == f"<human>:{turn.query}\n<bot>:"
        prompt_start = end
    assert prompt_start == n  # no BOS anywhere, nothing after the last EOS but padding
    assert tok.bos_id not in ids[:n]


def test_images_without_placeholders_go_first(tok):
    conv = formats.place_images(Conversation((Turn("Describe the image briefly.", "ok"),)), 2)
    assert conv.prefix == formats.IMAGE * 2
    row, images = formats.encode_conversation(conv, tok, 64, tok.vocab_size, Q)
    ids = row["input_ids"]
    assert images == 2 and (ids[: 2 * Q] == tok.vocab_size).all() and ids[2 * Q] != tok.vocab_size
    assert tok.decode(ids[2 * Q :]).startswith("<human>:Describe")
    assert not row["loss_mask"][: 2 * Q].any()


def test_images_the_text_does_not_place_go_first(tok):
    conv = formats.place_images(Conversation((Turn("What is it?", "a"), Turn("<image>And this?", "b"))), 2)
    assert conv.prefix == formats.IMAGE and conv.turns[1].query == "<image>And this?"


def test_multi_image_placeholders_expand_in_place(tok):
    turns = (Turn("<image>\nCompare with <image>.", "same"), Turn("And <image>?", "different"))
    row, images = encode(Conversation(turns), tok)
    ids = row["input_ids"]
    image_runs = runs((ids == tok.vocab_size).astype(np.int32))
    assert images == 3 and [e - s for s, e in image_runs] == [Q, Q, Q]
    (s1, e1), (s2, e2), (s3, _) = image_runs
    assert tok.decode(ids[:s1]) == "<human>:"
    assert tok.decode(ids[e1:s2]) == "\nCompare with "
    assert "<bot>:same" in tok.decode(ids[e2:s3]) and tok.decode(ids[e2:s3]).endswith("<human>:And ")
    assert not row["loss_mask"][ids == tok.vocab_size].any()


@pytest.mark.parametrize(
    "conv,num_images",
    [
        (Conversation((Turn("<image> and <image>", "x"),)), 1),
        (Conversation((Turn("<image>", "x"),)), 0),
        (Conversation((Turn("<image>", "look: <image>"),)), 2),
    ],
)
def test_placeholder_count_must_match_images(conv, num_images):
    with pytest.raises(errors.BadSample) as e:
        formats.place_images(conv, num_images)
    assert reason(e) == errors.IMAGE_COUNT_MISMATCH


def test_overlong_conversations_keep_whole_turns_and_their_images(tok):
    turns = (Turn("<image>What color?", "red"), Turn("And shape?", "circle"), Turn("<image>This one?", "square"))
    full, images = encode(Conversation(turns), tok)
    ends = [e for _, e in runs(full["loss_mask"])]
    cut, cut_images = encode(Conversation(turns), tok, max_len=ends[1] + 1)  # room for 2 turns, not 3
    assert cut_images == 1 and images == 2
    assert len(runs(cut["loss_mask"])) == 2 and (cut["input_ids"][: ends[1]] == full["input_ids"][: ends[1]]).all()
    with pytest.raises(errors.BadSample) as e:
        encode(Conversation(turns), tok, max_len=ends[0] - 1)
    assert reason(e) == errors.TEXT_TOO_LONG


@pytest.mark.parametrize(
    "conv",
    [
        Conversation(()),
        Conversation((Turn("q", " "),)),
        Conversation((Turn("", "a"),)),
        Conversation((Turn("q", "a"), Turn("q2", ""))),
    ],
)
def test_empty_text_is_rejected(tok, conv):
    with pytest.raises(errors.BadSample) as e:
        formats.encode_conversation(conv, tok, 64, tok.vocab_size, Q)
    assert reason(e) == errors.EMPTY_TEXT


def test_text_that_encodes_to_the_image_id_is_rejected(tok):
    red = tok.encode("red")[0]
    with pytest.raises(errors.BadSample) as e:
        formats.encode_conversation(Conversation((Turn("color?", "red"),)), tok, 64, red, Q)
    assert reason(e) == errors.IMAGE_TOKEN_IN_TEXT


def test_task_templates_are_bilingual():
    assert formats.conversation("caption", {"caption": "红色圆形。"}).turns[0].query == formats.PROMPTS["caption"]["zh"]
    assert formats.conversation("caption", {"caption": "A red circle."}).turns[0].query == "Describe the image briefly."
    g = formats.conversation("grounding", {"phrase": "the red circle", "box": [1, 2, 30, 40]}).turns[0]
    assert g == Turn("Give the bounding box of the red circle.", "[1,2,30,40]")
    gc = formats.conversation("grounded_caption", {"phrase": "红色圆形", "box": [1, 2, 30, 40]}).turns[0]
    assert gc == Turn("区域[1,2,30,40]里是什么？", "红色圆形")
    v = formats.conversation("vqa", {"question": "Is it red?", "answer": "yes"})
    assert v == Conversation((Turn("Is it red?", "yes"),))
    llava = formats.conversation(
        "conversation",
        {
            "conversations": [
                {"from": "human", "value": "<image>\nhi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "more"},
                {"from": "gpt", "value": "sure"},
            ]
        },
    )
    assert llava.turns == (Turn("<image>\nhi", "hello"), Turn("more", "sure"))
    assert formats.instruction(llava) == "hi\nmore"


@pytest.mark.parametrize(
    "task,ann,why",
    [
        ("segmentation", {"caption": "x"}, errors.UNKNOWN_TASK),
        ("vqa", {"question": "q"}, errors.BAD_ANNOTATION),
        ("caption", {"caption": 3}, errors.BAD_ANNOTATION),
        ("caption", {"caption": "x", "lang": "fr"}, errors.BAD_ANNOTATION),
        ("grounding", {"phrase": "p", "box": [5, 5, 1, 1]}, errors.BAD_ANNOTATION),
        ("grounding", {"phrase": "p", "box": [0, 0, 1000, 10]}, errors.BAD_ANNOTATION),
        ("grounding", {"phrase": "p", "box": [0.5, 0, 1, 1]}, errors.BAD_ANNOTATION),
        (
            "conversation",
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            errors.BAD_ANNOTATION,
        ),
        ("conversation", {"conversations": [{"from": "human", "value": "q"}]}, errors.BAD_ANNOTATION),
        ("conversation", {"conversations": []}, errors.EMPTY_TEXT),
    ],
)
def test_bad_annotations_are_named(task, ann, why):
    with pytest.raises(errors.BadSample) as e:
        formats.conversation(task, ann)
    assert reason(e) == why


def test_boxes_normalise_and_parse():
    assert formats.normalize_box([0, 0, 64, 64], 64, 64) == (0, 0, 999, 999)
    assert formats.normalize_box([16, 32, 48, 63.9], 64, 128) == (250, 250, 750, 499)
    text = "the box " + formats.box_to_text((250, 250, 750, 499)) + " and [0,1,2,3]"
    assert formats.parse_boxes(text) == [(250, 250, 750, 499), (0, 1, 2, 3)]


def test_qformer_text_truncation_sides(qtok):
    text = "one two three four five six seven eight nine ten eleven twelve"
    body = qtok.encode(text)
    assert len(body) > 8
    left = formats.encode_qformer_text(text, qtok, 8, "left")
    right = formats.encode_qformer_text(text, qtok, 8, "right")
    assert list(left["ids"]) == [qtok.cls_id, *body[-6:], qtok.sep_id] and left["mask"].all()
    assert list(right["ids"]) == [qtok.cls_id, *body[:6], qtok.sep_id]
    short = formats.encode_qformer_text("one", qtok, 8)
    n = len(qtok.encode("one")) + 2
    assert list(short["mask"]) == [1] * n + [0] * (8 - n) and (short["ids"][n:] == qtok.pad_id).all()
