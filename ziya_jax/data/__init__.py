"""Data layer: tokenizers, bilingual task formats, the synthetic set, image preprocessing, TFDS builders
and Grain pipelines. `tfds_builders` is not imported here, so the pipeline does not pay for importing TFDS."""

from ziya_jax.data.errors import BadSample, BadSampleError
from ziya_jax.data.formats import Conversation, Turn
from ziya_jax.data.manifest import ManifestSource
from ziya_jax.data.pipeline import DataConfig, Source, instruction_batches, mixture, pair_batches
from ziya_jax.data.synthetic import SyntheticSource, train_demo_tokenizers
from ziya_jax.data.tokenizers import QFormerTokenizer, SentencePieceTokenizer

__all__ = [
    "BadSample",
    "BadSampleError",
    "Conversation",
    "DataConfig",
    "ManifestSource",
    "QFormerTokenizer",
    "SentencePieceTokenizer",
    "Source",
    "SyntheticSource",
    "Turn",
    "instruction_batches",
    "mixture",
    "pair_batches",
    "train_demo_tokenizers",
]
