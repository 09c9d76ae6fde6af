"""Parity of our GPT-NeoX with transformers' implementation (the oracle).

Every architecture option Pythia checkpoints use is covered by a small random-weight config
(two layers keep the CPU run short; the per-layer code is the same for 32). Both
models hold identical weights (our state dict, loaded into transformers'), with LayerNorm
weights/biases and linear biases perturbed so that a norm or bias mix-up cannot hide.

Measured on CPU (torch 2.13, transformers 5.24, 2 cores), batch 2 x 48 random token ids:
- float32: max |logit diff| 5e-7 to 1.3e-6 against transformers' eager attention and 0 (bit
  for bit) against its default SDPA attention (gelu-new: 8e-7, its tanh-GELU formula differs),
  at positions 0..47 and 1500..1547 alike; the bound is FP32_TOL = 1e-4.
- bfloat16: bit-identical logits for 8 of the 9 configs; gelu-new differs by 0.0156 (one
  bfloat16 ulp at |logit| 2.45). See the bfloat16 section for the bounds and why.
- greedy: identical 64-token continuations (transformers' generate, our reference generator,
  our cached and cache-free argmax loops) for prompts of 1, 9 and 37 tokens.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from helpers import hf_greedy, hf_greedy_output
from tulu.model import ContiguousKVCache, GPTNeoXForCausalLM, NeoXConfig, preset

from .conftest import build_model, to_transformers

transformers = pytest.importorskip("transformers")

FP32_TOL = 1e-4
NEW_TOKENS = 64
PROMPT_LENGTHS = (1, 9, 37)


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """These models are small: their ops (decode steps above all) run faster on one thread
    than on a pool, and a pool slows down 5 to 10x when a 2-core machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CONFIGS: dict[str, NeoXConfig] = {
    "pythia-70m": preset("pythia-70m", num_hidden_layers=2),
    "pythia-160m": preset("pythia-160m", num_hidden_layers=2),
    "sequential-residual": preset("pythia-70m", num_hidden_layers=2, use_parallel_residual=False),
    "full-rotary": preset("pythia-70m", num_hidden_layers=2, rotary_pct=1.0),
    # head size 21 (odd) with rotary_pct 0.2 -> int(4.2) = 4 rotary dims (must be even)
    "odd-head-size": preset(
        "pythia-70m", num_hidden_layers=2, hidden_size=168, intermediate_size=672, rotary_pct=0.2
    ),
    "tied-embeddings": preset("pythia-70m", num_hidden_layers=2, tie_word_embeddings=True),
    "gelu-new": preset("pythia-70m", num_hidden_layers=2, hidden_act="gelu_new"),
    "no-attention-bias": preset("pythia-70m", num_hidden_layers=2, attention_bias=False),
    "rope-theta-linear-scaling": preset(
        "pythia-70m",
        num_hidden_layers=2,
        rotary_emb_base=50000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}
# Greedy decoding is the slow part on CPU: a subset (both residual forms, an odd head size).
GREEDY_CONFIGS = ("pythia-70m", "sequential-residual", "odd-head-size")


def random_ids(shape: tuple[int, ...], seed: int, high: int = 50277) -> torch.Tensor:
    """Token ids below the Pythia tokenizer's 50,277 (the padded rows are never real tokens)."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Twin:
    """Our model and transformers' with the same weights (shared by a module's tests)."""

    name: str
    ours: GPTNeoXForCausalLM
    hf: object
    _hf_greedy: dict[int, tuple[list[int], torch.Tensor]] = field(default_factory=dict)

    def prompt(self, length: int) -> list[int]:
        return random_ids((length,), seed=1000 + length).tolist()

    def hf_greedy(self, length: int) -> list[int]:
        """transformers' 64-token greedy continuation of `prompt(length)` (memoised)."""
        return self.hf_greedy_with_logits(length)[0]

    def hf_greedy_with_logits(self, length: int) -> tuple[list[int], torch.Tensor]:
        """The continuation and transformers' logits at each of its steps ([64, vocab])."""
        if length not in self._hf_greedy:
            # No EOS: all 64 tokens are compared.
            tokens, out = hf_greedy_output(
                self.hf, self.prompt(length), NEW_TOKENS, output_logits=True
            )
            self._hf_greedy[length] = tokens, torch.cat(out.logits).float()
        return self._hf_greedy[length]


@pytest.fixture(scope="module", params=list(CONFIGS))
def twin(request) -> Twin:
    """Module-scoped, so pytest groups each config's tests and builds its models once."""
    ours = build_model(CONFIGS[request.param], seed=sum(map(ord, request.param)))
    return Twin(request.param, ours, to_transformers(ours, attn_implementation="eager"))


@torch.no_grad()
def greedy_without_cache(
    model: GPTNeoXForCausalLM, prompt: list[int], new_tokens: int
) -> list[int]:
    """The plainest possible greedy loop: re-run the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]), logits_to_keep=1)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def greedy_with_cache(
    model: GPTNeoXForCausalLM, prompt: list[int], new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy over our ContiguousKVCache (one prefill, then one token per step): the tokens
    and the logits of every step ([new_tokens, vocab])."""
    param = next(model.parameters())
    cache = ContiguousKVCache(model.config, 1, len(prompt) + new_tokens, param.dtype, param.device)
    step = torch.tensor([prompt], device=param.device)
    out: list[int] = []
    all_logits = []
    while len(out) < new_tokens:
        start = cache.seq_len
        positions = torch.arange(start, start + step.shape[1], device=param.device)[None]
        logits = model(step, positions, backend=cache, logits_to_keep=1)[0, -1]
        cache.advance(step.shape[1])
        all_logits.append(logits.float())
        out.append(int(logits.argmax()))
        step = torch.tensor([[out[-1]]], device=param.device)
    return out, torch.stack(all_logits)


# ------------------------------------------------------------------------------- float32 logits
def test_fp32_logits_match_transformers(twin: Twin) -> None:
    ids = random_ids((2, 48), seed=0)
    far = torch.arange(1500, 1548).expand(2, 48)  # rotary at large positions too
    diffs = {}
    with torch.no_grad():
        ours = twin.ours(ids)
        ours_far = twin.ours(ids, far)
        assert ours.dtype == torch.float32 and ours.shape == (2, 48, twin.ours.config.vocab_size)
        for impl in ("eager", "sdpa"):  # eager: the textbook path; sdpa: transformers' default
            twin.hf.set_attn_implementation(impl)
            diffs[impl] = (ours - twin.hf(ids).logits).abs().max().item()
            diffs[f"{impl}@1500"] = (
                (ours_far - twin.hf(ids, position_ids=far).logits).abs().max().item()
            )
        twin.hf.set_attn_implementation("eager")
    print(f"{twin.name}: fp32 max |logit diff| {diffs}")
    assert max(diffs.values()) <= FP32_TOL, diffs


# ------------------------------------------------------------------------------- greedy decoding
@pytest.fixture
def greedy_twin(twin: Twin) -> Twin:
    """`twin`, parametrized with GREEDY_CONFIGS only, for the decoding tests."""
    return twin


@pytest.mark.parametrize("twin", GREEDY_CONFIGS, indirect=True)
def test_greedy_inline_loops_match_transformers_generate(greedy_twin: Twin) -> None:
    """Our argmax loops (our KV cache / no cache) == transformers' generate, token for token.

    Random-weight models fall into short cycles, so the per-step logits are compared too: every
    decode step's logits (our cache vs transformers' cache) agree within the float32 bound.
    """
    for length in PROMPT_LENGTHS:
        prompt = greedy_twin.prompt(length)
        expected, expected_logits = greedy_twin.hf_greedy_with_logits(length)
        tokens, logits = greedy_with_cache(greedy_twin.ours, prompt, NEW_TOKENS)
        assert tokens == expected, length
        step_diff = (logits - expected_logits).abs().max().item()
        assert step_diff <= FP32_TOL, (length, step_diff)
    # The cache-free loop re-runs the whole sequence per token: one prompt is enough.
    length = PROMPT_LENGTHS[1]
    expected = greedy_twin.hf_greedy(length)
    assert (
        greedy_without_cache(greedy_twin.ours, greedy_twin.prompt(length), NEW_TOKENS) == expected
    )


@pytest.mark.parametrize("twin", GREEDY_CONFIGS, indirect=True)
def test_reference_generator_matches_transformers_generate(greedy_twin: Twin) -> None:
    from tulu.engine.reference import generate_ids
    from tulu.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for length in PROMPT_LENGTHS:
        result = generate_ids(greedy_twin.ours, greedy_twin.prompt(length), params)
        assert result.token_ids == greedy_twin.hf_greedy(length), length


# ------------------------------------------------------------------------------- bfloat16 logits
# Random-weight logits are flat (std about 0.45 over 50k tokens), so in bfloat16 (8 significant
# bits) the top two tokens are often closer than the rounding error: transformers' own bfloat16
# logits pick a different top-1 than its float32 ones on up to 5% of positions. So rather than a
# bare top-1 rate, the test checks that
# - the two bfloat16 models differ by at most BF16_ULPS ulps of the largest logit (or by
#   transformers' own bfloat16 error against float32, if larger: for deep models on GPU).
#   Measured: 0 (bit-identical) except gelu-new, 1 ulp (0.0156). The headroom is for other
#   kernels (GPU) and for transformers models cast with `.to(torch.bfloat16)`, which also
#   rounds their rotary `inv_freq` buffer to bfloat16: that gave 1 to 2 ulps here.
# - our bfloat16 error against the float32 logits (same weights, upcast) is at most
#   BF16_ERROR_RATIO times transformers' plus one ulp. Measured: equal (0.008 to 0.022), and
#   0.0158 vs 0.0186 for gelu-new.
# - top-1 agreement is >= BF16_MIN_TOP1 (measured: 1.0, gelu-new 0.979 = 2 of 96 positions),
#   and every disagreement is a near tie: the two tokens' float32 logits are within the bound
#   (measured: 0.0068 for gelu-new's two).
BF16_ULPS = 4
BF16_ERROR_RATIO = 1.5
BF16_MIN_TOP1 = 0.9


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 numbers around |x| (8 significant bits)."""
    return 2.0 ** (torch.tensor(abs(x)).log2().floor().item() - 7)


def check_bf16_against(
    ours_bf16: torch.Tensor, hf_bf16: torch.Tensor, reference: torch.Tensor | None, label: str
) -> dict[str, float]:
    """The bfloat16 checks above (reference: float32 logits, or None when too big to keep)."""
    ours_bf16, hf_bf16 = ours_bf16.float(), hf_bf16.float()
    peak = hf_bf16.abs().max().item()
    tol = BF16_ULPS * bf16_ulp(peak)
    figures = {"peak": peak}
    if reference is not None:
        reference = reference.float()
        figures["ours_err"] = (ours_bf16 - reference).abs().max().item()
        figures["hf_err"] = (hf_bf16 - reference).abs().max().item()
        # Deep models (32 layers on GPU) may drift further: allow transformers' own error.
        tol = max(tol, figures["hf_err"])
    diff = (ours_bf16 - hf_bf16).abs().max().item()
    ours_top, hf_top = ours_bf16.argmax(-1), hf_bf16.argmax(-1)
    top1 = (ours_top == hf_top).float().mean().item()
    judge = reference if reference is not None else hf_bf16
    gaps = (judge.gather(-1, ours_top[..., None]) - judge.gather(-1, hf_top[..., None])).abs()
    figures.update(max_diff=diff, tol=tol, top1=top1, gap=gaps.max().item())
    print(f"{label}: bf16 {figures}")
    assert diff <= tol, figures
    assert top1 >= BF16_MIN_TOP1, figures
    assert gaps.max().item() <= tol, f"a top-1 disagreement is not a near tie: {figures}"
    if reference is not None:
        assert figures["ours_err"] <= BF16_ERROR_RATIO * figures["hf_err"] + bf16_ulp(peak), figures
    return figures


def test_bf16_logits_match_transformers(twin: Twin) -> None:
    ids = random_ids((2, 48), seed=0)
    ours_bf16 = copy.deepcopy(twin.ours).to(torch.bfloat16)
    hf_bf16 = to_transformers(ours_bf16, attn_implementation=None)  # same bf16 weights, SDPA
    with torch.no_grad():
        reference = twin.ours(ids)
        check_bf16_against(ours_bf16(ids), hf_bf16(ids).logits, reference, twin.name)


# ------------------------------------------------------------------------------- training path
# The pythia-70m shape with a small vocabulary: the LM head's size is irrelevant here.
TRAIN_VOCAB = 4096
TRAIN_CONFIG = preset("pythia-70m", num_hidden_layers=2, vocab_size=TRAIN_VOCAB)


@pytest.fixture(scope="module")
def train_pair() -> tuple[GPTNeoXForCausalLM, object]:
    ours = build_model(TRAIN_CONFIG, seed=3)
    return ours, to_transformers(ours, attn_implementation="eager")


@contextlib.contextmanager
def training_forward(model: GPTNeoXForCausalLM) -> Iterator[None]:
    """`model` in training mode (the training path: packed segments, padding masks), without
    gradients, for the block; back in eval mode after it, even when it fails, since
    `train_pair` is shared by the module's tests."""
    model.train()
    try:
        with torch.no_grad():
            yield
    finally:
        model.eval()


def test_packed_segments_match_separate_examples(train_pair) -> None:
    model, _ = train_pair
    a, b = random_ids((1, 19), 1, TRAIN_VOCAB), random_ids((1, 29), 2, TRAIN_VOCAB)
    packed = torch.cat([a, b], dim=1)
    segment_ids = torch.tensor([[0] * 19 + [1] * 29])
    positions = torch.cat([torch.arange(19), torch.arange(29)])[None]
    with training_forward(model):
        logits = model(packed, positions, segment_ids=segment_ids)
        alone_a, alone_b = model(a), model(b)
    torch.testing.assert_close(logits[:, :19], alone_a, rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(logits[:, 19:], alone_b, rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_unpadded_and_transformers(train_pair, side: str) -> None:
    model, hf = train_pair
    short, full = random_ids((1, 30), 4, TRAIN_VOCAB), random_ids((1, 48), 5, TRAIN_VOCAB)
    pad = torch.full((1, 18), TRAIN_VOCAB - 1)  # garbage if it leaked into real tokens
    row = torch.cat([short, pad] if side == "right" else [pad, short], dim=1)
    ids = torch.cat([row, full])
    mask = torch.ones_like(ids)
    real = slice(0, 30) if side == "right" else slice(18, 48)
    mask[0] = 0
    mask[0, real] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    with training_forward(model):
        padded = model(ids, positions, attention_mask=mask)
        alone_short, alone_full = model(short), model(full)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(padded[:1, real], alone_short, rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(padded[1:], alone_full, rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(padded[:1, real], theirs[:1, real], rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(padded[1:], theirs[1:], rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_gradient_checkpointing_gives_same_loss_and_grads(packed: bool) -> None:
    model = build_model(TRAIN_CONFIG, seed=5)
    ids = random_ids((2, 40), 6, TRAIN_VOCAB)
    labels = ids.clone()
    labels[:, :7] = -100  # prompt tokens are not trained
    kwargs = {}
    if packed:
        kwargs["segment_ids"] = torch.tensor([[0] * 15 + [1] * 25] * 2)
        kwargs["position_ids"] = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, 40)
    calls = []  # layer 0's forward calls: checkpointing re-runs it during backward
    layer0, forward = model.gpt_neox.layers[0], model.gpt_neox.layers[0].forward

    def counted_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    layer0.forward = counted_forward  # (forward hooks do not fire on recomputation)
    model.train()
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        total, count = model.loss(ids, labels, **kwargs)
        (total / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((total.detach(), count, grads))
        assert len(calls) == (2 if checkpointing else 1)
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = results
    assert count_a == count_b == 2 * (40 - 7)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    if not packed:  # our summed loss / count is transformers' mean loss
        hf = to_transformers(model.eval())
        with torch.no_grad():
            hf_loss = hf(ids, labels=labels).loss
        torch.testing.assert_close(loss_a / count_a, hf_loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_dropout_matches_transformers_in_training_mode(parallel: bool) -> None:
    """A config's hidden_dropout and attention_dropout were parsed and then ignored: training
    a checkpoint that asks for dropout ran without it. Drawn from the same seed, our dropout
    masks are transformers' (same places, same order of draws), so the logits match exactly;
    eval mode (inference) has none."""
    config = preset(
        "pythia-70m",
        num_hidden_layers=2,
        hidden_dropout=0.3,
        attention_dropout=0.2,
        use_parallel_residual=parallel,
    )
    ours = build_model(config, seed=3)
    theirs = to_transformers(ours, attn_implementation="sdpa")
    ids = random_ids((2, 24), 4, config.vocab_size)
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.manual_seed(11)
        dropped = ours(ids)
        torch.manual_seed(11)
        torch.testing.assert_close(dropped, theirs(ids).logits, rtol=0, atol=FP32_TOL)
        torch.manual_seed(12)
        assert (ours(ids) - dropped).abs().max() > 0.1  # other masks: dropout is applied
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=FP32_TOL)
        torch.testing.assert_close(ours(ids), ours(ids), rtol=0, atol=0)


def test_gradient_checkpointing_replays_the_same_dropout_masks() -> None:
    config = preset("pythia-70m", num_hidden_layers=2, hidden_dropout=0.1, attention_dropout=0.1)
    model = build_model(config, seed=4).train()
    ids = random_ids((2, 32), 8, config.vocab_size)
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(21)
        total, count = model.loss(ids, ids)
        (total / count).backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------- weight tying
def test_meta_materialised_tied_model_stays_tied() -> None:
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(
            preset("pythia-14m", num_hidden_layers=1, tie_word_embeddings=True)
        )
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight


# ------------------------------------------------------------------------------- GPU, Pythia-6.9B
def compare_bf16_with_transformers(
    config: NeoXConfig,
    device: str,
    logits_shape: tuple[int, int],
    prompt_lengths: tuple[int, ...],
    label: str,
) -> None:
    """Random-weight bfloat16 models, ours vs transformers': logits, then greedy continuations.

    Greedy continuations may part at a bfloat16 near tie; the test then checks that the two
    candidate tokens' logits (ours, teacher-forced) are within the logits bound.
    """
    from tulu.engine.reference import generate_ids
    from tulu.engine.sampling import SamplingParams

    # Built on meta and materialised on `device` in bfloat16: no float32 or CPU copy.
    ours = build_model(
        config, seed=0, device=device, dtype=torch.bfloat16, on_device=device != "cpu"
    )
    hf = to_transformers(ours, attn_implementation=None)  # a second copy on the device
    ids = random_ids(logits_shape, seed=0).to(device)
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids).float(), hf(ids).logits.float()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    runs = []
    for length in prompt_lengths:
        prompt = random_ids((length,), seed=2000 + length).tolist()
        theirs = hf_greedy(hf, prompt, NEW_TOKENS)
        runs.append((prompt, generate_ids(ours, prompt, params).token_ids, theirs))
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    with torch.no_grad():  # float32 reference (exactly the bfloat16 weights, upcast)
        reference = ours.float()(ids)
    ours.to(torch.bfloat16)  # back to the weights both generated with (exact)
    figures = check_bf16_against(ours_logits, hf_logits, reference, label)

    for prompt, mine, theirs in runs:
        split = next((i for i, (x, y) in enumerate(zip(mine, theirs, strict=True)) if x != y), None)
        agreed = NEW_TOKENS if split is None else split
        print(f"{label}: prompt of {len(prompt)} tokens, greedy agreement {agreed}/{NEW_TOKENS}")
        if split is not None:
            context = torch.tensor([prompt + mine[:split]], device=device)
            with torch.no_grad():
                last = ours(context, logits_to_keep=1)[0, -1].float()
            gap = (last[mine[split]] - last[theirs[split]]).abs().item()
            print(f"  parted at token {split}: logit gap {gap:.4f} (bound {figures['tol']:.4f})")
            assert gap <= figures["tol"], (split, gap, figures)


def test_bf16_comparison_on_cpu() -> None:
    """The GPU test's procedure on a small config, so that it is known to work without a GPU."""
    config = preset("pythia-70m", num_hidden_layers=2)
    compare_bf16_with_transformers(config, "cpu", (1, 48), (7,), "pythia-70m-2-layers cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pythia_6_9b_bf16_cuda_matches_transformers() -> None:
    """The exact Pythia-6.9B config, random weights, bfloat16 on CUDA (run with -s for figures)."""
    compare_bf16_with_transformers(
        preset("pythia-6.9b"), "cuda", (2, 128), (7, 100), "pythia-6.9b cuda"
    )
