"""The GPT-NeoX model, its config, and Hugging Face checkpoint loading/saving."""

from tulu.model.config import NeoXConfig, preset
from tulu.model.gpt_neox import AttentionBackend, ContiguousKVCache, GPTNeoXForCausalLM

__all__ = ["AttentionBackend", "ContiguousKVCache", "GPTNeoXForCausalLM", "NeoXConfig", "preset"]
