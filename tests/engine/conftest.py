"""Shared fixtures for the engine tests: tiny random models, a scripted model, engines that
are checked to be idle (empty KV pool, no queued sequences) when the test ends.

The helpers are handed out as fixtures (factories) rather than imported, because several
directories of this test tree have a module called `conftest`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tulu.engine.engine import LLM, EngineConfig, LLMEngine
from tulu.model import GPTNeoXForCausalLM, NeoXConfig, preset
from tulu.tokenizer import Tokenizer


def tiny_config(vocab_size: int = 512, max_positions: int = 256, **overrides) -> NeoXConfig:
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "torch_dtype": "float32",
        "max_position_embeddings": max_positions,
        # Larger than Pythia's 0.02, so that a random model's greedy continuations depend on
        # the context (with 0.02 every prompt continues with the same token forever).
        "initializer_range": 0.1,
    }
    fields.update(overrides)
    return preset("pythia-14m", **fields)


def random_model(config: NeoXConfig, seed: int, *, perturb: bool = True) -> GPTNeoXForCausalLM:
    """`config`'s model with seeded random weights, in eval mode; `perturb=False` keeps
    init_weights' norms and biases as they are."""
    model = GPTNeoXForCausalLM(config)
    model.init_weights(seed)
    if not perturb:
        return model.eval()
    # init_weights leaves norms at 1 and biases at 0; perturb them so that a dropped or
    # misplaced norm/bias in the engine's path would change the outputs.
    gen = torch.Generator().manual_seed(seed + 101)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def scripted_config(vocab_size: int, max_positions: int, eos_token_id: int) -> NeoXConfig:
    """The smallest GPT-NeoX trunk (one layer, hidden 8) for a model whose logits are scripted
    rather than computed: the trunk only supplies `config` and `parameters()`."""
    return preset(
        "pythia-14m",
        vocab_size=vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        torch_dtype="float32",
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
    )


class ScriptedModel(GPTNeoXForCausalLM):
    """A GPT-NeoX whose logits are a fixed table indexed by position.

    The logits computed at position p (the ones that predict token p + 1) are `table[p]`,
    whatever the tokens are, so the KV cache is never consulted: `hidden_states` returns the
    one-hot encoding of each position and `embed_out` is a linear map holding the table. Both
    the engine (`hidden_states` + `embed_out`) and the reference generator (`forward`) see the
    same logits. The small real trunk only supplies `config` and `parameters()`.
    """

    def __init__(self, table: torch.Tensor, *, eos_token_id: int = 0):
        positions, vocab = table.shape
        super().__init__(scripted_config(vocab, positions, eos_token_id))
        self.init_weights(0)
        self.embed_out = nn.Linear(positions, vocab, bias=False)
        with torch.no_grad():
            self.embed_out.weight.copy_(table.float().T)
        self.eval()

    def hidden_states(self, input_ids, position_ids=None, **kwargs):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t).expand(b, t)
        return nn.functional.one_hot(position_ids, self.config.max_position_embeddings).float()


def script_table(
    tokens_at: dict[int, int],
    *,
    vocab_size: int,
    positions: int = 128,
    filler: int | None = None,
) -> torch.Tensor:
    """A logits table: position p strongly predicts `tokens_at[p]` (logit 20), `filler`
    comes second everywhere (logit 10), every other token gets 0."""
    table = torch.zeros(positions, vocab_size)
    if filler is not None:
        table[:, filler] = 10.0
    for position, token in tokens_at.items():
        table[position, token] = 20.0
    return table


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and are immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model() -> GPTNeoXForCausalLM:
    """Random GPT-NeoX: vocab 512, 2 layers, hidden 64, context window 256, float32."""
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def demo_tokenizer() -> Tokenizer:
    """The demo's byte-level BPE (600 tokens, <|endoftext|> = 0), trained on the demo corpus."""
    from tulu.demo import corpus_text, train_tokenizer

    return train_tokenizer(corpus_text())


@pytest.fixture(scope="session")
def neox_tok(neox_tokenizer_path: Path) -> Tokenizer:
    """The real GPT-NeoX-20B tokenizer (skips when ../shared lacks it)."""
    return Tokenizer.from_file(neox_tokenizer_path)


@pytest.fixture(params=["tiny", "neox"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    """Each tokenizer in turn: the module's own `tiny_tok` fixture (a small BPE trained on the
    module's texts, always available), then `neox_tok` (skips when ../shared is absent)."""
    return request.getfixturevalue(f"{request.param}_tok")


@pytest.fixture(scope="session")
def tok_model() -> GPTNeoXForCausalLM:
    """Random GPT-NeoX with the demo tokenizer's (padded) vocabulary of 640."""
    return random_model(tiny_config(vocab_size=640), seed=1)


@pytest.fixture(scope="session")
def scripted_model() -> Callable[..., ScriptedModel]:
    """Factory: `scripted_model(table, eos_token_id=0)`; see ScriptedModel."""
    return ScriptedModel


@pytest.fixture(scope="session")
def make_table() -> Callable[..., torch.Tensor]:
    """Factory: see script_table."""
    return script_table


@pytest.fixture(scope="session")
def hf_twin() -> Callable[[GPTNeoXForCausalLM], nn.Module]:
    """Factory: transformers' GPTNeoXForCausalLM holding our model's weights (eval, float32)."""

    def build(model: GPTNeoXForCausalLM) -> nn.Module:
        import transformers

        hf_config = transformers.GPTNeoXConfig(**model.config.to_dict())
        hf = transformers.GPTNeoXForCausalLM(hf_config)
        state = dict(model.state_dict())
        state["lm_head.weight"] = state.pop("embed_out.weight")
        hf.load_state_dict(state, strict=True)
        return hf.eval()

    return build


def check_idle(engine: LLMEngine) -> None:
    """Nothing queued, nothing running, every KV block back in the pool."""
    assert not engine.scheduler.waiting, "sequences left waiting"
    assert not engine.scheduler.running, "sequences left running"
    assert not engine.has_unfinished_requests()
    assert engine.num_unfinished_requests == 0
    assert engine.pool.num_used == 0, f"{engine.pool.num_used} KV blocks still in use"
    assert all(count == 0 for count in engine.pool.ref_count)
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.fixture
def _engines() -> Iterator[list[LLMEngine]]:
    """Every engine a test makes; each is checked to be idle when the test ends (a leaked KV
    block or a forgotten sequence fails the test)."""
    engines: list[LLMEngine] = []
    yield engines
    for engine in engines:
        check_idle(engine)


@pytest.fixture
def make_engine(_engines) -> Callable[..., LLMEngine]:
    """Factory: `make_engine(model, tokenizer=None, **EngineConfig fields)` (idle-checked)."""

    def make(model, tokenizer=None, **config) -> LLMEngine:
        engine = LLMEngine(model, tokenizer, EngineConfig(**config))
        _engines.append(engine)
        return engine

    return make


@pytest.fixture
def make_llm(_engines) -> Callable[..., LLM]:
    """Factory: `make_llm(model, tokenizer=None, **EngineConfig fields)` (idle-checked)."""

    def make(model, tokenizer=None, **config) -> LLM:
        llm = LLM(model, tokenizer, EngineConfig(**config))
        _engines.append(llm.engine)
        return llm

    return make


@pytest.fixture(scope="session")
def drain() -> Callable[..., dict]:
    """`drain(engine, max_steps=10_000)`: step until nothing is unfinished; returns
    {request_id: [RequestOutput, ...]} in step order. Fails instead of looping forever."""

    def run(engine: LLMEngine, max_steps: int = 10_000) -> dict:
        outputs: dict = {}
        for _ in range(max_steps):
            if not engine.has_unfinished_requests():
                return outputs
            for output in engine.step():
                outputs.setdefault(output.request_id, []).append(output)
        raise AssertionError(f"engine still busy after {max_steps} steps: {engine.stats()}")

    return run


# ----------------------------------------------------------------------------------------------
# Structured output cases, shared with the server tests: bounded constraints that the random
# models complete within a few dozen tokens, and a check of a reply made without xgrammar.
# ----------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}
REGEX = r"(cat|dog)s? [0-9]{2}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "a" [bc] [bc]? ("!" | "?")'
LIST_GRAMMAR = 'root ::= item ("," item)? \nitem ::= [0-9] | "ab"'
#: Each grammar above as a Python regex, to check a reply without xgrammar.
GRAMMAR_REGEX = {GRAMMAR: r"a[bc]{1,2}[!?]", LIST_GRAMMAR: r"([0-9]|ab)(,([0-9]|ab))?"}


def satisfies(kind: str, value: object, text: str) -> bool:
    """Whether `text` meets the constraint `kind` ("json" = SCHEMA, "json_object", "regex",
    "choice", "grammar" = one of GRAMMAR_REGEX's) with `value`, checked by Python itself (json,
    re)."""
    if kind == "json":
        reply = json.loads(text)
        return (
            set(reply) == {"color", "ok", "size"}
            and reply["color"] in ("red", "green", "blue")
            and isinstance(reply["ok"], bool)
            and type(reply["size"]) is int
            and 0 <= reply["size"] <= 99
        )
    if kind == "json_object":
        return isinstance(json.loads(text), dict)
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "choice":
        return text in value
    return re.fullmatch(GRAMMAR_REGEX[value], text) is not None
