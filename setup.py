"""infdiff: resolution-agnostic image diffusion in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="infdiff",
    version="0.1.0",
    description="Resolution-agnostic image diffusion (RaPD, INFD, ∞-Diff, Patch-DM, InfGen) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["infdiff", "infdiff.*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.0,<2",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "einops>=0.8,<0.9",
        "clu>=0.0.12,<0.1",
        "transformers>=5,<6",
        "tokenizers>=0.21,<1",
        "safetensors>=0.4,<1",
        "tensorboardX>=2.6,<3",
        "pillow>=11,<14",
        "scikit-image>=0.25,<0.27",
        "numpy>=2,<3",
        "scipy>=1.13,<2",
        "ml-dtypes>=0.5",
        "absl-py>=2,<3",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3,<4",
            "chex>=0.1.90,<0.2",
            "ruff>=0.8",
            "pyink>=24",
            # tests/test_notebooks.py runs colabs/*.ipynb
            "nbclient>=0.10,<0.12",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "matplotlib>=3.9,<4",
        ],
        # colabs/*.ipynb (infdiff.notebook.show and the plots)
        "notebook": [
            "matplotlib>=3.9,<4",
            "ipykernel>=6.29,<8",
        ],
        # The GPU path (Pallas kernels through Triton, cuDNN attention), at the locked JAX:
        # pip install -r requirements-lock.txt && pip install -e .[gpu]
        "gpu": [
            "jax[cuda12]==0.10.2",
            "jax-triton==0.3.1",
        ],
        # Only for scripts/make_parity_fixtures.py: the canonical PyTorch references.
        "parity": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "transformers==5.23.0",
            "tokenizers==0.23.3",
            "safetensors==0.8.0",
            "lpips==0.1.4",
            "pytorch-fid==0.3.0",
            "diffusers==0.36.0",
        ],
    },
)
