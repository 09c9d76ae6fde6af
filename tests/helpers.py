"""Helpers that tests in several directories share, imported rather than handed out as fixtures
(several directories of this test tree have a module called `conftest`, so a helper there is
reachable only through its directory's name).

- `hf_greedy`: transformers' `generate` as the greedy oracle of the model and engine tests;
- `mean_model_logprob`: a sample's mean log-probability, the oracle of `best_of` rankings;
- `train_tiny_bpe`: a small byte-level BPE trained in a blink, for tests that must not depend
  on the real tokenizer in ../shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def hf_greedy_output(
    hf: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos: int | None = None,
    **generate_kwargs: Any,
) -> tuple[list[int], Any]:
    """transformers' greedy continuation of one unpadded prompt, on `hf`'s device: (the new
    tokens, `generate`'s output dict, which holds e.g. the logits asked for with
    ``output_logits=True``).

    With `eos` None the continuation never stops early and has exactly `max_new_tokens`
    tokens (also held by `min_new_tokens`, in case `generate` reads a None as "the model's
    default"); with an `eos` it stops there and pads with it. `generate_kwargs` add logits
    processors (``sequence_bias``, ``logits_processor``, ...).
    """
    if eos is None:
        stop = {"eos_token_id": None, "pad_token_id": 0, "min_new_tokens": max_new_tokens}
    else:
        stop = {"eos_token_id": eos, "pad_token_id": eos}
    ids = torch.tensor([list(prompt)], device=next(hf.parameters()).device)
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            **stop,
            **generate_kwargs,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert eos is not None or len(tokens) == max_new_tokens, (len(tokens), max_new_tokens)
    return tokens, out


def hf_greedy(hf: Any, prompt: Sequence[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """The new tokens of `hf_greedy_output` (same arguments)."""
    return hf_greedy_output(hf, prompt, max_new_tokens, **kwargs)[0]


def mean_model_logprob(model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> float:
    """The mean log-probability `model` gives each of `output_ids` after `prompt_ids`, from one
    plain full forward (no cache): the independent check of a `best_of` ranking."""
    ids = [*prompt_ids, *output_ids]
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    picks = [scores[p - 1, ids[p]].item() for p in range(len(prompt_ids), len(ids))]
    return sum(picks) / len(picks)


def train_tiny_bpe(
    texts: Iterable[str], vocab_size: int = 300, special_tokens: Sequence[str] = (EOT,)
) -> Backend:
    """A byte-level BPE in the GPT-NeoX style (the special tokens first: <|endoftext|> = 0)
    trained on `texts` in milliseconds, so that a test never depends on ../shared; every byte
    is in its alphabet, so any text (non-ASCII included) encodes."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend
