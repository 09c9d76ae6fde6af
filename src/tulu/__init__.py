"""tulu: train, evaluate and serve instruction-tuned GPT-NeoX models in the Tulu chat format."""

__version__ = "0.1.0"
