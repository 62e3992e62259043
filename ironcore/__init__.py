"""IronCore: train GPT-2 and LLaMA-style language models (pretrain, SFT, DPO) from one YAML file."""

__version__ = "0.1.0"
