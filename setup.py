from setuptools import find_packages, setup

SERVE = [
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "prometheus-client>=0.20",
    "gradio>=6,<7",
]  # the page relies on Gradio 6's chat format

setup(
    name="ziya_jax",
    version="0.1.0",
    description="Ziya-Visual (EVA ViT + BLIP-2 Q-Former + LLaMA with LoRA) in JAX/Flax",
    packages=find_packages(include=["ziya_jax", "ziya_jax.*"]),
    package_data={"ziya_jax.data.bmmic": ["prompts/*.json", "object_names.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",  # BERT WordPiece for the Q-Former's bert-base-uncased vocab.txt
        "pyarrow>=14",  # img2dataset parquet shards (python -m ziya_jax.data convert)
        "ml-collections>=1.1.0",
        "einops>=0.8",
        "numpy>=2.0",
        "pillow>=11",
        "safetensors>=0.6",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "pycocoevalcap>=1.2",  # CIDEr / BLEU / METEOR scorers for captioning evaluation
        "jieba>=0.42",  # Chinese word segmentation for Chinese caption metrics
        "qwix>=0.1.8",  # int8 weight-only quantisation for decoding (ziya_jax.quantize)
    ],
    entry_points={
        "console_scripts": [
            f"ziya-{name}=ziya_jax.{module}:main"
            for name, module in (
                ("train", "train.__main__"),
                ("generate", "generate"),
                ("chat", "chat"),
                ("evaluate", "evaluate.__main__"),
                ("convert", "convert.__main__"),
                ("compile", "compile"),
                ("serve", "serve.__main__"),
            )
        ]
    },
    extras_require={
        # Ground truth for the tests: transformers (PyTorch, CPU) on the same weights.
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on two workers (-n 2)
            "torch==2.13.0",
            "transformers>=5.23,<6",
            "jax[tpu]",
            "ruff==0.17.6",
            *SERVE,
            "openai>=2",  # the official client the server is tested with
            "selenium>=4.20",  # drives Chromium over the chat page
        ],
        # python -m ziya_jax.serve: the OpenAI-compatible API, its metrics, and the chat page.
        "serve": SERVE,
        # ziya_jax.llm: BMMIC data (python -m ziya_jax.data bmmic) and the LLaVA-bench judge.
        "llm": ["openai>=2"],
        # Compiling for TPU topologies on any host (python -m ziya_jax.compile), and running on TPU VMs. jax[tpu]
        # pins the libtpu built for the installed jax: libtpu 0.0.52 beside jax 0.10.2 crashed jax.profiler.
        "tpu": ["jax[tpu]"],
    },
)
