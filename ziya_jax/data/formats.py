"""Task formats: annotations -> bilingual conversations -> token ids with a loss mask.

Ziya's prompt: each turn is `<human>:{query}\\n<bot>:` followed by the answer and EOS; turns are concatenated
with no BOS; the loss covers answers and their EOS only. An image is `<image>` in the text; it becomes
`num_query_tokens` copies of `image_token_id`, and the i-th run receives the row's i-th image. Images the
text does not place go before the first turn (BLIP-2/Ziya put the image queries before the text).
`model_input` is the one function that turns a conversation into model input, for training and inference.

Annotation schemas (fields of a manifest record, or what the synthetic set derives from a scene):
  caption           {"caption"}
  vqa               {"question", "answer"}
  grounding         {"phrase", "box"}          answer: the box as text
  grounded_caption  {"box", "phrase"}          answer: the phrase
  conversation      {"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}  (LLaVA)
An optional "lang" ("en"/"zh") picks the prompt language; without it Chinese text selects "zh".

Boxes are written as `[x1,y1,x2,y2]`: integers 0..999, the pixel coordinate divided by the image width
(x) or height (y), times 1000, floored, clipped to 999.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from ziya_jax.data import errors

IMAGE = "<image>"
HUMAN, BOT = "<human>", "<bot>"
TASKS = ("caption", "vqa", "grounding", "grounded_caption", "conversation")
LANGS = ("en", "zh")
BOX_BINS = 1000

PROMPTS = {
    "caption": {"en": "Describe the image briefly.", "zh": "请简要描述这张图片。"},
    "grounding": {"en": "Give the bounding box of {phrase}.", "zh": "请给出{phrase}的边界框。"},
    "grounded_caption": {"en": "What is in the region {box}?", "zh": "区域{box}里是什么？"},
}
_HUMAN_ROLES, _BOT_ROLES = ("human", "user"), ("gpt", "assistant", "bot")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_BOX = re.compile(r"\[(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\]")


@dataclasses.dataclass(frozen=True)
class Turn:
    query: str
    answer: str | None  # None: the question the model is to answer (the last turn of a prompt)


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    prefix: str = ""  # text before the first turn: where images go when the turns have no <image>


def detect_lang(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def normalize_box(box: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2) -> integers 0..999 (see the module docstring)."""
    x1, y1, x2, y2 = box
    scale = np.array([BOX_BINS / width, BOX_BINS / height] * 2)
    return tuple(int(v) for v in np.clip(np.floor(np.array([x1, y1, x2, y2]) * scale), 0, BOX_BINS - 1))


def box_to_text(box: Sequence[int]) -> str:
    """A normalised box as text; rejects anything that is not 4 ordered ints in 0..999."""
    if (
        len(box) != 4
        or not all(isinstance(v, (int, np.integer)) and 0 <= v < BOX_BINS for v in box)
        or box[0] > box[2]
        or box[1] > box[3]
    ):
        raise errors.BadSample(errors.BAD_ANNOTATION, f"box {list(box)} is not [x1,y1,x2,y2] with ints 0..999")
    return "[{},{},{},{}]".format(*(int(v) for v in box))


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every `[x1,y1,x2,y2]` in a text (e.g. a generated grounding answer)."""
    return [tuple(int(v) for v in m) for m in _BOX.findall(text)]


def _field(ann: Mapping, key: str, task: str):
    if key not in ann:
        raise errors.BadSample(errors.BAD_ANNOTATION, f"task {task!r} needs field {key!r}, got {sorted(ann)}")
    return ann[key]


def _text(ann: Mapping, key: str, task: str) -> str:
    value = _field(ann, key, task)
    if not isinstance(value, str):
        raise errors.BadSample(errors.BAD_ANNOTATION, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _lang(ann: Mapping, text: str) -> str:
    lang = ann.get("lang") or detect_lang(text)
    if lang not in LANGS:
        raise errors.BadSample(errors.BAD_ANNOTATION, f"lang {lang!r}; known: {list(LANGS)}")
    return lang


def conversation(task: str, ann: Mapping) -> Conversation:
    """The conversation a task makes of an annotation (schemas in the module docstring)."""
    if task == "conversation":
        return _llava_conversation(_field(ann, "conversations", task))
    if task == "vqa":
        return Conversation((Turn(_text(ann, "question", task), _text(ann, "answer", task)),))
    if task == "caption":
        caption = _text(ann, "caption", task)
        return Conversation((Turn(PROMPTS[task][_lang(ann, caption)], caption),))
    if task in ("grounding", "grounded_caption"):
        phrase, box = _text(ann, "phrase", task), box_to_text(_field(ann, "box", task))
        prompt = PROMPTS[task][_lang(ann, phrase)]
        if task == "grounding":
            return Conversation((Turn(prompt.format(phrase=phrase), box),))
        return Conversation((Turn(prompt.format(box=box), phrase),))
    raise errors.BadSample(errors.UNKNOWN_TASK, f"{task!r}; known: {list(TASKS)}")


def _llava_conversation(messages) -> Conversation:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise errors.BadSample(
            errors.EMPTY_TEXT if not messages else errors.BAD_ANNOTATION,
            f"conversations must be a non-empty list, got {messages!r:.80}",
        )
    if len(messages) % 2:
        raise errors.BadSample(errors.BAD_ANNOTATION, f"{len(messages)} messages; want human/gpt pairs")
    turns = []
    for i in range(0, len(messages), 2):
        q, a = messages[i], messages[i + 1]
        roles = (q.get("from") if isinstance(q, Mapping) else None, a.get("from") if isinstance(a, Mapping) else None)
        if roles[0] not in _HUMAN_ROLES or roles[1] not in _BOT_ROLES:
            raise errors.BadSample(
                errors.BAD_ANNOTATION, f"messages {i},{i + 1} have roles {roles}; want human then gpt"
            )
        if not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
            raise errors.BadSample(errors.BAD_ANNOTATION, f"messages {i},{i + 1}: 'value' must be strings")
        turns.append(Turn(q["value"], a["value"]))
    return Conversation(tuple(turns))


def place_images(conv: Conversation, num_images: int) -> Conversation:
    """Images the text does not place (by `<image>`) go before the first turn, in order; the placeholders take
    the rest. More placeholders than images, or one in an answer, is a mismatch."""
    found = conv.prefix.count(IMAGE) + sum(t.query.count(IMAGE) + (t.answer or "").count(IMAGE) for t in conv.turns)
    if any(IMAGE in (t.answer or "") for t in conv.turns) or found > num_images:
        raise errors.BadSample(
            errors.IMAGE_COUNT_MISMATCH,
            f"{found} {IMAGE} placeholders (answers must have none) for {num_images} images",
        )
    return dataclasses.replace(conv, prefix=IMAGE * (num_images - found) + conv.prefix)


def instruction(conv: Conversation) -> str:
    """The Q-Former instruction for Chat: every query, placeholders removed, one per line."""
    return "\n".join(t.query.replace(IMAGE, "").strip() for t in conv.turns)


def _segment(text: str, tok, image_ids: list[int], image_token_id: int) -> list[int]:
    """Tokens of a text whose <image> placeholders become image_ids."""
    ids = []
    for k, part in enumerate(text.split(IMAGE)):
        if k:
            ids.extend(image_ids)
        if part:
            part_ids = tok.encode(part)
            if image_token_id in part_ids:
                raise errors.BadSample(errors.IMAGE_TOKEN_IN_TEXT, f"{part!r:.80} encodes to id {image_token_id}")
            ids.extend(part_ids)
    return ids


def _encode(conv: Conversation, tok, max_len: int, image_token_id: int, num_query_tokens: int):
    """-> (ids, loss mask, images used, turns kept); see encode_conversation."""
    image_ids = [image_token_id] * num_query_tokens
    if not conv.turns:
        raise errors.BadSample(errors.EMPTY_TEXT, "no turns")
    ids = _segment(conv.prefix, tok, image_ids, image_token_id)
    mask = [0] * len(ids)
    images, kept = conv.prefix.count(IMAGE), 0
    for n, turn in enumerate(conv.turns):
        is_open = turn.answer is None and n == len(conv.turns) - 1
        if not turn.query.strip() or not (is_open or (turn.answer or "").strip()):
            raise errors.BadSample(errors.EMPTY_TEXT, f"turn {n}: query {turn.query!r:.40}, answer {turn.answer!r:.40}")
        prompt = _segment(f"{HUMAN}:{turn.query}\n{BOT}:", tok, image_ids, image_token_id)
        answer = [] if is_open else _segment(turn.answer, tok, image_ids, image_token_id) + [tok.eos_id]
        if len(ids) + len(prompt) + len(answer) > max_len:
            if n == 0 or is_open:
                raise errors.BadSample(
                    errors.TEXT_TOO_LONG,
                    f"{'the question' if is_open else 'the first turn'} "
                    f"needs {len(ids) + len(prompt) + len(answer)} > {max_len} tokens",
                )
            break
        ids += prompt + answer
        mask += [0] * len(prompt) + [1] * len(answer)
        images += turn.query.count(IMAGE)
        kept += 1
    return ids, mask, images, kept


def encode_conversation(
    conv: Conversation, tok, max_len: int, image_token_id: int, num_query_tokens: int
) -> tuple[dict[str, np.ndarray], int]:
    """-> ({input_ids, attention_mask, loss_mask} int32 [max_len], images used).

    loss_mask is 1 on answer tokens and their EOS. Turns that do not fit are dropped from the end (with the
    images only they referenced); if not even the first turn fits the sample is rejected, since cutting a
    turn would train on a broken answer or a partial image. A last turn whose answer is None is the question
    the model is to answer: the ids end in `<bot>:`, and it must fit with everything before it."""
    ids, mask, images, _ = _encode(conv, tok, max_len, image_token_id, num_query_tokens)
    return _padded(ids, mask, max_len, tok.pad_id), images


def _padded(ids: list[int], mask: list[int], length: int, pad_id: int) -> dict[str, np.ndarray]:
    pad = length - len(ids)
    return {
        "input_ids": np.array(ids + [pad_id] * pad, np.int32),
        "attention_mask": np.array([1] * len(ids) + [0] * pad, np.int32),
        "loss_mask": np.array(mask + [0] * pad, np.int32),
    }


def model_input(
    conv: Conversation,
    num_images: int,
    tok,
    qformer_tok,
    *,
    max_len: int,
    image_token_id: int,
    num_query_tokens: int,
    instruction_len: int,
    pad: bool = True,
) -> tuple[dict[str, np.ndarray], int]:
    """The one way a conversation becomes model input, for training data and every inference path alike:
    images placed (`place_images`), the turns that fit encoded (`encode_conversation`), and for a Chat model
    (instruction_len > 0) the Q-Former instruction of those turns (`instruction`, left-truncated).
    -> ({input_ids, attention_mask, loss_mask[, qformer_ids, qformer_mask]}, images used); pad=False leaves
    the LLM arrays at the conversation's own length (a prompt to decode from)."""
    conv = place_images(conv, num_images)
    ids, mask, images, kept = _encode(conv, tok, max_len, image_token_id, num_query_tokens)
    arrays = _padded(ids, mask, max_len if pad else len(ids), tok.pad_id)
    if instruction_len:
        if qformer_tok is None:
            raise ValueError("a Chat model needs the Q-Former tokenizer (qformer.model or vocab.txt)")
        q = encode_qformer_text(
            instruction(dataclasses.replace(conv, turns=conv.turns[:kept])), qformer_tok, instruction_len
        )
        arrays["qformer_ids"], arrays["qformer_mask"] = q["ids"], q["mask"]
    return arrays, images


def encode_qformer_text(text: str, qtok, max_len: int, truncate: str = "left") -> dict[str, np.ndarray]:
    """`[CLS] body [SEP]` padded to max_len -> {ids, mask} int32 [max_len]. The body is cut from the left
    for instructions (InstructBLIP: the latest words matter) and from the right for captions (BLIP-2)."""
    if truncate not in ("left", "right"):
        raise ValueError(f"truncate must be 'left' or 'right', got {truncate!r}")
    body = qtok.encode(text)
    keep = max_len - 2
    if len(body) > keep:
        body = body[len(body) - keep :] if truncate == "left" else body[:keep]
    ids = [qtok.cls_id, *body, qtok.sep_id]
    pad = max_len - len(ids)
    return {
        "ids": np.array(ids + [qtok.pad_id] * pad, np.int32),
        "mask": np.array([1] * len(ids) + [0] * pad, np.int32),
    }


class PromptTooLong(ValueError):
    """A prompt that does not fit in the model's context with the tokens to generate."""


def prompt_input(
    turns: Sequence[Turn], num_images: int, tok, qformer_tok, cfg, max_new_tokens: int, prefix: str = ""
) -> dict[str, np.ndarray]:
    """What a model (cfg: its ModelConfig) reads to answer the last turn (answer None) of a conversation, with
    `prefix` before its first turn: `model_input` unpadded, with max_new_tokens of the LLM's context left free.
    -> {input_ids, attention_mask [, qformer_ids, qformer_mask]}, each [T]. Raises PromptTooLong, or ValueError
    for other bad input."""
    context = cfg.llm.max_position_embeddings - max_new_tokens
    try:
        arrays, _ = model_input(
            Conversation(tuple(turns), prefix),
            num_images,
            tok,
            qformer_tok,
            max_len=context,
            image_token_id=cfg.image_token_id,
            num_query_tokens=cfg.num_query_tokens,
            instruction_len=cfg.instruction_len if cfg.variant == "chat" else 0,
            pad=False,
        )
    except errors.BadSample as e:
        kind = PromptTooLong if e.reason == errors.TEXT_TOO_LONG else ValueError
        raise kind(
            f"{e.detail} (the context is {cfg.llm.max_position_embeddings} tokens, {max_new_tokens} of them "
            f"kept for the answer)"
            if kind is PromptTooLong
            else str(e)
        ) from None
    del arrays["loss_mask"]
    return arrays
