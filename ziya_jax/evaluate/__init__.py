"""Evaluation: the paper's benchmark protocol (captioning CIDEr via pycocoevalcap, VQA score with the official
normalisation, GQA exact match, ScienceQA-IMG constrained to its choices, VizWiz, retrieval recall from ITC with
optional ITM re-ranking, grounding accuracy) on local copies of the public data, and the synthetic set's test
split as a bilingual benchmark for the demo. CLI: `python -m ziya_jax.evaluate`."""
