"""BMMIC: bilingual multi-modal in-context instruction data, built by an LLM behind any OpenAI-compatible
chat-completions endpoint from symbolic representations of images (captions, tagged boxes), then translated,
rewritten and filtered (`python -m ziya_jax.data bmmic --help`, docs/bmmic.md).

Every stage writes LLaVA-style manifest records that `ziya_jax.data.manifest.ManifestSource` reads:
  {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...],
   "lang": "en" | "zh", "bmmic": {"stage", "type" | "scheme", "tags", "captions", "objects", "source"}}
"bmmic" is provenance: what the LLM was shown (boxes in the 0..999 convention of `ziya_jax.data.formats`),
which the filter uses to find answers naming objects that were not there.
"""
