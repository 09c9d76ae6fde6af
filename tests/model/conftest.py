"""Model-test helpers: random-weight GPT-NeoX models and their transformers twins.

transformers is the oracle for the model tests: `to_transformers(model)` builds Hugging Face's
`GPTNeoXForCausalLM` from our config's `to_dict()` (so it also checks that transformers reads
the configs we write) and loads our state dict into it unchanged, except for the LM head, which
transformers 5 calls `lm_head.weight` where checkpoints (and we) say `embed_out.weight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tulu.model import GPTNeoXForCausalLM, NeoXConfig


@torch.no_grad()
def perturb_norms_and_biases(model: GPTNeoXForCausalLM, seed: int, scale: float = 0.1) -> None:
    """Add small noise to LayerNorm weights/biases and linear biases.

    `init_weights` leaves norms at 1/0 and biases at 0, which would let a swapped, dropped or
    mis-named norm or bias go unnoticed by a parity test.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            params = [module.weight, module.bias]
        elif isinstance(module, nn.Linear) and module.bias is not None:
            params = [module.bias]
        else:
            continue
        for p in params:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.add_(noise.to(device=p.device, dtype=p.dtype))


def build_model(
    config: NeoXConfig,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    perturb: bool = True,
    on_device: bool = False,
) -> GPTNeoXForCausalLM:
    """Our model with seeded random weights, in eval mode.

    Built on the meta device and materialised directly on `device` in `dtype` (no throw-away
    default initialisation, no float32 copy of a big model), then `init_weights(seed)`.
    `on_device` draws the weights on `device` (see `init_weights`): seconds instead of about
    40 s of single-threaded CPU sampling for 6.9B, which a short GPU session cannot spare.
    """
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model.to(dtype)  # free on meta: materialise directly in the target dtype
    model.to_empty(device=device)
    model.init_weights(seed, on_device=on_device)  # also re-ties a head to_empty() untied
    if perturb:
        perturb_norms_and_biases(model, seed)
    return model.eval()


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' context that skips its random init (we overwrite every weight anyway)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def to_transformers(model: GPTNeoXForCausalLM, attn_implementation: str | None = "eager"):
    """transformers' GPTNeoXForCausalLM with our model's config and weights, in eval mode.

    It lives on our model's device in our model's dtype. `attn_implementation=None` keeps
    transformers' default (SDPA).
    """
    import transformers

    param = next(model.parameters())
    hf_config = transformers.GPTNeoXConfig(**model.config.to_dict())
    kwargs: dict = {"dtype": param.dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(param.device), _no_init_weights():
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
    if model.config.tie_word_embeddings:
        hf.tie_weights()  # skipped along with the init above
    # Never stop early at EOS in generate(): parity runs compare full-length continuations.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    state = dict(model.state_dict())
    hf_keys = set(hf.state_dict())
    if "lm_head.weight" in hf_keys and "embed_out.weight" in state:
        state["lm_head.weight"] = state.pop("embed_out.weight")
    hf.load_state_dict(state, strict=True)
    if model.config.tie_word_embeddings:
        assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    return hf.eval()


@pytest.fixture
def make_model() -> Callable[..., GPTNeoXForCausalLM]:
    """Factory fixture: `make_model(config, seed=0, device=..., dtype=...)` (see build_model)."""
    return build_model


@pytest.fixture
def hf_twin() -> Callable[..., object]:
    """Factory fixture: `hf_twin(model, attn_implementation="eager")` (see to_transformers)."""
    return to_transformers
