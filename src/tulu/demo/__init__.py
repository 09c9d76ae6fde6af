"""`tulu demo` and the tiny models behind it and the tests, with nothing downloaded.

This module holds the building blocks: a byte-level BPE tokenizer in the GPT-NeoX style trained
on bundled text (`train_tokenizer`, `corpus_text`) and a tiny random GPT-NeoX (`tiny_model`).
The demo itself (data, training, evaluation, serving) is `tulu.demo.pipeline`; the
fixture-sized benchmarks it evaluates on are `tulu.demo.eval_data`.
"""

from __future__ import annotations

from importlib import resources

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tulu.model.config import preset
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer

EOS = "<|endoftext|>"
PAD = "<|padding|>"


def corpus_text() -> str:
    return resources.files("tulu.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE in the GPT-NeoX style (<|endoftext|> = 0, <|padding|> = 1)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text.split(EOS), trainer=trainer)
    return Tokenizer(backend, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=512)


def tiny_model(vocab: int, seed: int) -> GPTNeoXForCausalLM:
    padded_vocab = -(-vocab // 64) * 64  # padded like Pythia's embeddings
    config = preset(
        "pythia-14m",
        vocab_size=padded_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        torch_dtype="float32",
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(seed)
    return model.eval()
