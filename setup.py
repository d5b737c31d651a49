"""Install the QLoRA library: `pip install -e .[test,demo]`.

torch is pinned to the CPU build that lies on this disk (2.13.0); a bare
`torch` requirement would pull a multi-GB CUDA build from the registry.
"""
from setuptools import setup

setup(
    name="handrolled-qlora",
    version="0.1.0",
    description="QLoRA by hand in PyTorch: NF4 base weights, LoRA adapters, an explicit training loop.",
    packages=["model", "quant", "lora", "train"],
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "bitsandbytes==0.50.2",
        "safetensors==0.8.0",
        "sentencepiece==0.2.3",
        "tokenizers==0.23.3",
        "jinja2==3.1.6",          # chat templates, in its sandbox
        "gguf==0.19.0",
        "tensorboard==2.21.0",
        "tqdm==4.70.1",
        "numpy>=1.26,<3",
    ],
    extras_require={
        # References the tests compare against; never imported by library code. One more, llama.cpp itself
        # (llama-cpp-python==0.3.36, the GGUF export's reference), is pinned in the Makefile instead, which
        # builds it once from its source distribution for `make test`: listed here, every install of this
        # extra (make demo's too) would compile llama.cpp again.
        "test": [
            "pytest==9.2.0",
            "transformers==5.23.0",
            "peft==0.21.2",
            "trl==1.16.0",        # DPOTrainer and GRPOTrainer, the references of tests/test_dpo.py and test_grpo.py
            "hypothesis==6.170.17",
        ],
        "demo": ["matplotlib==3.11.2"],
    },
)
