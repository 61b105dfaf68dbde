"""The bundled synthetic bilingual set: shapes on noisy backgrounds, with captions, VQA, grounding,
grounded captions and multi-turn conversations in English and Chinese.

Each example is a pure function of (seed, split, index): split s of seed k draws from
`np.random.default_rng([k, s, index])`, so train/validation/test come from disjoint seed sequences and
nothing is stored or downloaded. A scene has 1-4 objects centred in distinct cells of a 3x3 grid, each a
distinct (colour, shape) pair, so every object can be named unambiguously by "colour shape" or by its cell.
Texts are short and templated, and objects are not jittered within their cells, on purpose: the demo model is
tiny and must learn them (with jitter, a probe training the demo ViT to name single shapes reached 57% test
accuracy in 400 steps; centred, 93%).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from ziya_jax.data import errors, formats, tokenizers

#            name       中文     RGB
COLORS = (
    ("red", "红色", (220, 40, 40)),
    ("orange", "橙色", (245, 140, 20)),
    ("yellow", "黄色", (235, 220, 40)),
    ("green", "绿色", (40, 170, 60)),
    ("blue", "蓝色", (40, 80, 220)),
    ("purple", "紫色", (150, 60, 200)),
)
SHAPES = (("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("diamond", "菱形"), ("cross", "十字"))
#            name       中文     fraction of a grid cell
SIZES = (("small", "小的", 0.5), ("medium", "中等的", 0.7), ("large", "大的", 0.9))
GRID = 3
POSITIONS = (
    ("top left", "左上"),
    ("top", "上方"),
    ("top right", "右上"),
    ("left", "左侧"),
    ("center", "中间"),
    ("right", "右侧"),
    ("bottom left", "左下"),
    ("bottom", "下方"),
    ("bottom right", "右下"),
)
CELL_OF = {name: cell for cell, (name, _) in enumerate(POSITIONS)}  # row-major grid cell of a position
SPLITS = {"train": 0, "validation": 1, "test": 2}
VQA_KINDS = ("color", "shape", "count", "position", "yesno")
MAX_OBJECTS = 4

_ZH = {name: zh for name, zh, *_ in (*COLORS, *SHAPES, *SIZES, *POSITIONS)}
_RGB = {name: rgb for name, _, rgb in COLORS}
_FRACTION = {name: f for name, _, f in SIZES}
_QUESTIONS = {
    "en": {
        "color": "What color is the object at the {pos}?",
        "shape": "What shape is the object at the {pos}?",
        "count": "How many objects are there?",
        "position": "Where is the {color} {shape}?",
        "yesno": "Is there a {color} {shape}?",
    },
    "zh": {
        "color": "{pos}的物体是什么颜色？",
        "shape": "{pos}的物体是什么形状？",
        "count": "图中有几个物体？",
        "position": "{color}{shape}在哪里？",
        "yesno": "图中有{color}{shape}吗？",
    },
}
_YES_NO = {"en": ("yes", "no"), "zh": ("是", "否")}


def _word(name: str, lang: str) -> str:
    return _ZH[name] if lang == "zh" else name


def example_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def sample_scene(rng: np.random.Generator, image_size: int) -> dict:
    """Objects with names, cell and box (pixels, float) plus the background/noise parameters."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), n, replace=False)
    cell = image_size / GRID
    objects = []
    for c, p in zip(cells, pairs):
        size = SIZES[int(rng.integers(len(SIZES)))][0]
        side = _FRACTION[size] * cell
        cx, cy = (np.array([c % GRID, c // GRID]) + 0.5) * cell
        objects.append(
            {
                "color": COLORS[p // len(SHAPES)][0],
                "shape": SHAPES[p % len(SHAPES)][0],
                "size": size,
                "position": POSITIONS[c][0],
                "box_px": [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2],
            }
        )
    objects.sort(key=lambda o: CELL_OF[o["position"]])
    background = {
        "level": rng.uniform(70, 190),
        "tint": rng.uniform(-20, 20, 3),
        "angle": rng.uniform(0, 2 * np.pi),
        "ramp": rng.uniform(0, 40),
        "noise": rng.uniform(3, 10),
    }
    return {"objects": objects, "background": background}


def render(scene: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 3]: tinted gradient background, jittered object colours, Gaussian noise over all."""
    bg = scene["background"]
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    ramp = (np.cos(bg["angle"]) * xs + np.sin(bg["angle"]) * ys) * bg["ramp"]
    base = bg["level"] + bg["tint"][None, None, :] + ramp[..., None]
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for obj in scene["objects"]:
        x1, y1, x2, y2 = obj["box_px"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        fill = tuple(int(v) for v in np.clip(np.array(_RGB[obj["color"]]) + rng.integers(-20, 21, 3), 0, 255))
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
        else:  # cross
            t = (x2 - x1) / 6
            draw.rectangle((x1, cy - t, x2, cy + t), fill=fill)
            draw.rectangle((cx - t, y1, cx + t, y2), fill=fill)
    noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * np.float32(bg["noise"])
    noisy = np.asarray(im, np.float32) + noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def generate(split: str, index: int, image_size: int = 64, seed: int = 0) -> tuple[np.ndarray, dict]:
    """-> (image uint8 [S, S, 3], scene). The scene's boxes are normalised (formats.normalize_box), so
    they stay valid when the image is resized."""
    rng = example_rng(split, index, seed)
    scene = sample_scene(rng, image_size)
    image = render(scene, image_size, rng)
    objects = [
        {k: v for k, v in o.items() if k != "box_px"}
        | {"box": list(formats.normalize_box(o["box_px"], image_size, image_size))}
        for o in scene["objects"]
    ]
    return image, {"objects": objects}


CELL_ATTRIBUTES = {"color": [c for c, *_ in COLORS], "shape": [s for s, _ in SHAPES], "size": [s for s, *_ in SIZES]}


def cell_labels(scene: dict) -> np.ndarray:
    """int32 [GRID * GRID, 3]: each cell's colour, shape and size index (CELL_ATTRIBUTES order, row-major cells);
    an empty cell holds each attribute's class count ("nothing")."""
    labels = np.array([[len(v) for v in CELL_ATTRIBUTES.values()]] * (GRID * GRID), np.int32)
    for o in scene["objects"]:
        labels[CELL_OF[o["position"]]] = [names.index(o[a]) for a, names in CELL_ATTRIBUTES.items()]
    return labels


def caption(scene: dict, lang: str) -> str:
    objs = scene["objects"]
    if lang == "zh":
        parts = [f"{_ZH[o['position']]}是一个{_ZH[o['size']]}{_ZH[o['color']]}{_ZH[o['shape']]}" for o in objs]
        return f"图中有{len(objs)}个物体：" + "，".join(parts) + "。"
    parts = [f"a {o['size']} {o['color']} {o['shape']} at the {o['position']}" for o in objs]
    if len(parts) == 1:
        return f"There is {parts[0]}."
    return f"There are {len(objs)} objects: " + ", ".join(parts[:-1]) + f" and {parts[-1]}."


def vqa(scene: dict, kind: str, lang: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, one-word answer) of one kind: color, shape, count, position or yesno."""
    objs = scene["objects"]
    obj = objs[int(rng.integers(len(objs)))]
    q = _QUESTIONS[lang][kind]
    if kind == "count":
        return q, str(len(objs))
    if kind in ("color", "shape"):
        return q.format(pos=_word(obj["position"], lang)), _word(obj[kind], lang)
    if kind == "position":
        return q.format(color=_word(obj["color"], lang), shape=_word(obj["shape"], lang)), _word(obj["position"], lang)
    if kind != "yesno":
        raise ValueError(f"unknown VQA kind {kind!r}; known: {VQA_KINDS}")
    present = {(o["color"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        color, shape = obj["color"], obj["shape"]
    else:
        absent = [(c, s) for c, *_ in COLORS for s, _ in SHAPES if (c, s) not in present]
        color, shape = absent[int(rng.integers(len(absent)))]
    answer = _YES_NO[lang][0 if (color, shape) in present else 1]
    return q.format(color=_word(color, lang), shape=_word(shape, lang)), answer


def annotate(scene: dict, task: str, lang: str, rng: np.random.Generator) -> dict:
    """A scene as the annotation of one task (schemas in formats), in one language."""
    if lang not in formats.LANGS:
        raise ValueError(f"unknown language {lang!r}; known: {formats.LANGS}")
    objs = scene["objects"]
    if task == "caption":
        return {"caption": caption(scene, lang), "lang": lang}
    if task == "vqa":
        kind = VQA_KINDS[int(rng.integers(len(VQA_KINDS)))]
        question, answer = vqa(scene, kind, lang, rng)
        return {"question": question, "answer": answer, "lang": lang, "kind": kind}
    if task in ("grounding", "grounded_caption"):
        obj = objs[int(rng.integers(len(objs)))]
        name = f"{_word(obj['color'], lang)}{'' if lang == 'zh' else ' '}{_word(obj['shape'], lang)}"
        article = "" if lang == "zh" else ("the " if task == "grounding" else "a ")
        return {"phrase": article + name, "box": list(obj["box"]), "lang": lang}
    if task == "conversation":
        kinds = rng.choice(VQA_KINDS, int(rng.integers(2, 4)), replace=False)
        messages = []
        for kind in kinds:
            question, answer = vqa(scene, str(kind), lang, rng)
            messages += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"conversations": messages, "lang": lang}
    raise errors.BadSample(errors.UNKNOWN_TASK, f"{task!r}; the synthetic set knows {list(formats.TASKS)}")


def corpus(num_scenes: int = 400, seed: int = 0) -> list[str]:
    """Every kind of text the set produces, in Ziya's prompt format, for training the demo tokenizers."""
    texts = []
    for i in range(num_scenes):
        rng = example_rng("train", i, seed)
        scene = generate("train", i, image_size=64, seed=seed)[1]
        for lang in formats.LANGS:
            for task in formats.TASKS:
                conv = formats.conversation(task, annotate(scene, task, lang, rng))
                texts.append("".join(f"{formats.HUMAN}:{t.query}\n{formats.BOT}:{t.answer}" for t in conv.turns))
    return texts


def train_demo_tokenizers(
    out_dir: str, llm_vocab_size: int = 640, qformer_vocab_size: int = 640, num_scenes: int = 400, seed: int = 0
) -> tuple[str, str]:
    """Trains the demo's LLM and Q-Former sentencepiece models on `corpus` (deterministic, about a second)
    -> paths of `llm.model` and `qformer.model` in out_dir. No piece crosses a Chinese word boundary, so
    "红色正方形在哪里" is 红色/正方形/在/哪里, as "Where is the red square" is five words. The LLM model has
    `<human>`/`<bot>` as single pieces and ids 0 unk, 1 bos, 2 eos; the Q-Former model has a pad id and
    [CLS]/[SEP]/[DEC].
    Neither ever produces id `vocab_size`, so a model with one more vocabulary entry can use it as
    `image_token_id`."""
    texts = corpus(num_scenes, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "llm.model"), os.path.join(out_dir, "qformer.model")
    for path, size, symbols, pad in (
        (paths[0], llm_vocab_size, tokenizers.ZIYA_ROLE_TOKENS, False),
        (paths[1], qformer_vocab_size, tokenizers.QFORMER_SPECIALS, True),
    ):
        with open(path, "wb") as f:
            f.write(tokenizers.train_sentencepiece(texts, size, symbols, pad=pad, chinese_words=True))
    return paths


class SyntheticSource:
    """Random-access source of synthetic records, rendered on demand (no files):
    {"id": "train-7", "images": [uint8 [S, S, 3]], "annotation": {"scene": {...}}}."""

    def __init__(self, split: str, num_examples: int, image_size: int = 64, seed: int = 0):
        example_rng(split, 0, seed)  # validates the split
        self.split, self.num_examples, self.image_size, self.seed = split, num_examples, image_size, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} synthetic examples")
        image, scene = generate(self.split, int(index), self.image_size, self.seed)
        return {"id": f"{self.split}-{index}", "images": [image], "annotation": {"scene": scene}}

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})"
        )
