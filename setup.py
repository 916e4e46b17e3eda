"""Packaging entry point for memagent-jax.

Install for use:          pip install torch==2.13.0 && pip install -e .
Install for development:  pip install torch==2.13.0 && pip install -e ".[test]"

torch is only a reference/benchmark dependency (the PyTorch side of parity tests and
side-by-side benchmarks). Install the pinned CPU wheel *first*: an unpinned torch pulls
gigabytes of CUDA packages.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "numpy>=2.0",
    "ml_dtypes>=0.5",
    "tokenizers>=0.21",
    "transformers>=5.0,<6",
    "datasets>=4.0",
    "pyarrow>=15",
    "tqdm>=4.60",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

EXTRAS = {
    # Reference implementations for parity tests and benchmarks.
    "torch": ["torch==2.13.0"],
    # TensorBoard itself, to look at the event files train writes: tensorboard --logdir <workdir>/tensorboard
    "tensorboard": ["tensorboard>=2.15"],
    # ArrayRecord materialisation for pods (tensorflow itself stays optional).
    "tfds": ["tensorflow-datasets>=4.9", "array_record>=0.5", "importlib_resources"],
    # The HTTP server: memagent serve --model DIR
    "serve": ["fastapi>=0.115", "uvicorn>=0.30"],
    # Weights & Biases logging of training metrics: --config.wandb.enabled=True
    "wandb": ["wandb>=0.17"],
    # LoRA adapters (config.lora.rank > 0): qwix's LoRA rule and einsum shapes; pinned (its shape helper is internal)
    "lora": ["qwix==0.1.8"],
    "test": [
        "torch==2.13.0",
        "ruff==0.17.6",  # lint and format (make lint); pinned so the formatter's output does not drift
        "pytest>=8",
        "hypothesis>=6",
        "tensorflow-datasets>=4.9",
        "array_record>=0.5",
        "importlib_resources",
        "fastapi>=0.115",
        "uvicorn>=0.30",
        "openai>=1.40",
        "httpx>=0.27",
        "qwix==0.1.8",
        "wandb==0.31.0",  # the offline-run reader of tests/test_wandb.py follows this version's file format
        # tests/test_notebook.py runs examples/quickstart.ipynb in a kernel of the test interpreter
        "nbformat==5.11.1",
        "nbclient==0.11.0",
        "ipykernel==7.4.0",
    ],
}

setup(
    name="memagent-jax",
    version="0.1.0",
    description="Memory agents for arbitrarily long documents, trained with multi-conversation GRPO, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["memagent_jax", "memagent_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "memagent=memagent_jax.cli:main",
        ],
    },
)
