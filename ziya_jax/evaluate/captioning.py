"""Caption metrics through pycocoevalcap's own scorers (CIDEr-D, BLEU-4, METEOR), after the tokenisation in
`text` (PTB for English, jieba for Chinese). Scores are reported x100, as the papers' tables print them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ziya_jax.evaluate import text


def caption_scores(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    lang: str,
    *,
    en_tokenizer: str = "auto",
    bleu: bool = True,
    meteor: bool = False,
) -> dict:
    """Corpus scores of one prediction per image against its references (raw text; tokenised here).

    METEOR (English only, needs Java) is opt-in: it starts a JVM with a 2 GB heap. The returned dict names the
    tokenisation convention used, so a score file says how it was computed."""
    missing = sorted(set(references) - set(predictions))[:5]
    if missing or set(predictions) - set(references):
        raise ValueError(f"predictions and references must cover the same ids (e.g. missing {missing})")
    if not references:
        raise ValueError("no captions to score")
    if any(not refs for refs in references.values()):
        raise ValueError("every image needs at least one reference caption")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(references)
    flat = [r for i in ids for r in references[i]] + [predictions[i] for i in ids]
    tokenizer = text.resolve_en_tokenizer(en_tokenizer) if lang == "en" else "jieba"
    tokens = text.tokenize(flat, lang, tokenizer if lang == "en" else "auto")
    gts, pos = {}, 0
    for i in ids:
        gts[i] = tokens[pos : pos + len(references[i])]
        pos += len(references[i])
    res = {i: [tokens[pos + k]] for k, i in enumerate(ids)}
    out = {"CIDEr": 100.0 * float(Cider().compute_score(gts, res)[0])}
    if bleu:
        out["BLEU-4"] = 100.0 * float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    if meteor:
        if lang != "en" or not text.java_available():
            raise ValueError("METEOR needs English captions and Java")
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
    out["tokenization"] = f"{tokenizer}: {text.CONVENTIONS[lang]}"
    return out
