"""Graph-safe decode attention (`tulu.engine.decode_attention`) against the engine's
per-sequence `PagedAttention`: same outputs, same cache contents.

Random caches, random non-contiguous block tables with a block shared by several sequences
(a prefix-cache hit), context lengths 1, block boundaries and in between, padding rows, several
head sizes, block sizes and dtypes. The `sdpa` implementation runs directly; the Triton kernel
runs in Triton's interpreter on CPU tensors: the variable `TRITON_INTERPRET=1` must be set
before Triton is first imported (Triton defines its own library functions at import, and other
tests may import it through torch), so `test_triton_kernel_runs_in_a_child_process` reruns this
module's `interpreted` tests in a child pytest with the variable set; the parent's environment
is never touched. The kernel is also compiled for the H100/H200 (sm_90) without a GPU, which
checks what interpreting cannot; GPU-only checks (the compiled kernel's results) are marked
`gpu`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tulu.engine import decode_attention as da
from tulu.engine.attention import PagedAttention, StepLayout
from tulu.engine.decode_attention import DecodeAttention, DecodeMetadata
from tulu.engine.kv_cache import KVCacheSpec, PagedKVCache
from tulu.model import preset

pytestmark = pytest.mark.usefixtures("single_thread")

INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


REPO_ROOT = Path(__file__).resolve().parents[2]

# The Triton tests run only where TRITON_INTERPRET=1 was set at start-up (the child process).
interpreted = pytest.mark.skipif(
    not da.triton_interpreting(),
    reason="needs TRITON_INTERPRET=1 before triton is imported: run in a child process by "
    "test_triton_kernel_runs_in_a_child_process",
)


def run_interpreted_child(test_file: str) -> str:
    """Run `test_file`'s tests named *interpreted* in a child pytest with TRITON_INTERPRET=1;
    fail with its output if any fails, skip if Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the kernel cannot be tested")
    if da.triton_interpreting():
        pytest.skip("this run already interprets Triton: the tests ran in this process")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            test_file,
            "-q",
            "-k",
            "interpreted",
            "-m",
            "not gpu",
            "-p",
            "no:cacheprovider",
        ],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert " passed" in out.stdout and " skipped" not in out.stdout, report
    return out.stdout


def make_cache(
    *, heads: int, head_size: int, block_size: int, num_blocks: int, dtype, layers=2, seed=0
):
    config = preset(
        "pythia-14m",
        hidden_size=heads * head_size,
        num_attention_heads=heads,
        num_hidden_layers=layers,
    )
    cache = PagedKVCache(config, KVCacheSpec(num_blocks, block_size), dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=gen))
    cache.values.copy_(torch.randn(cache.values.shape, generator=gen))
    return cache


def clone_cache(cache: PagedKVCache) -> PagedKVCache:
    twin = PagedKVCache.__new__(PagedKVCache)
    twin.__dict__.update(cache.__dict__)
    twin.keys, twin.values = cache.keys.clone(), cache.values.clone()
    return twin


def random_tables(ctx_lens, block_size, num_blocks, seed):
    """Block tables drawn at random from blocks 0..num_blocks-2 (the last one is the scratch
    block); one full block is shared as the first block of every sequence longer than a block.
    Returns (tables, slots of each sequence's new token)."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks - 1, generator=gen).tolist()
    shared = free.pop()
    tables = []
    for n in ctx_lens:
        need = -(-n // block_size)
        table = [shared] if n > block_size else []
        table += [free.pop() for _ in range(need - len(table))]
        tables.append(table)
    slots = [
        t[(n - 1) // block_size] * block_size + (n - 1) % block_size
        for n, t in zip(ctx_lens, tables, strict=True)
    ]
    return tables, slots


def run_both(
    impl, *, heads, head_size, block_size, ctx_lens, dtype, num_padding=0, seed=0, layer=1
):
    """(reference output [B, H, D], decode output [B + padding, H, D], reference cache,
    decode cache, scratch block)."""
    max_blocks = max(-(-n // block_size) for n in ctx_lens) + 2  # padded tables
    needed = sum(-(-n // block_size) for n in ctx_lens) + 2
    num_blocks = needed + 3
    cache = make_cache(
        heads=heads,
        head_size=head_size,
        block_size=block_size,
        num_blocks=num_blocks,
        dtype=dtype,
        seed=seed,
    )
    ref_cache, dec_cache = cache, clone_cache(cache)
    tables, slots = random_tables(ctx_lens, block_size, num_blocks, seed + 1)
    scratch = num_blocks - 1
    b = len(ctx_lens)
    gen = torch.Generator().manual_seed(seed + 2)
    q, k, v = (
        torch.randn(b + num_padding, heads, 1, head_size, generator=gen).to(dtype) for _ in range(3)
    )

    layout = StepLayout.build(
        ref_cache,
        slots,
        [(i, i + 1, n, t) for i, (n, t) in enumerate(zip(ctx_lens, tables, strict=True))],
    )
    flat = [x[:b].transpose(0, 2) for x in (q, k, v)]  # [1, H, B, D]: the engine's flat row
    ref = PagedAttention(ref_cache, layout).attend(layer, *flat)[0].transpose(0, 1)

    pad_table = [scratch] * max_blocks
    filler = torch.randint(0, num_blocks, (max_blocks,), generator=gen).tolist()
    meta = DecodeMetadata(
        torch.tensor(slots + [scratch * block_size] * num_padding, dtype=torch.int64),
        torch.tensor(
            [t + filler[len(t) :] for t in tables] + [pad_table] * num_padding, dtype=torch.int32
        ),
        torch.tensor(list(ctx_lens) + [0] * num_padding, dtype=torch.int32),
    )
    out = DecodeAttention(dec_cache, meta, impl).attend(layer, q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    return ref, out[:, :, 0], ref_cache, dec_cache, scratch


def check(impl, *, dtype=torch.float32, num_padding=0, **kw):
    ref, out, ref_cache, dec_cache, scratch = run_both(
        impl, dtype=dtype, num_padding=num_padding, **kw
    )
    b = ref.shape[0]
    torch.testing.assert_close(out[:b].float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.isfinite(out).all()
    # Same cache contents everywhere but the scratch block (padding rows write there).
    keep = torch.ones(dec_cache.num_blocks, dtype=torch.bool)
    keep[scratch] = False
    assert torch.equal(dec_cache.keys[:, keep], ref_cache.keys[:, keep])
    assert torch.equal(dec_cache.values[:, keep], ref_cache.values[:, keep])
    if num_padding == 0:
        assert torch.equal(dec_cache.keys, ref_cache.keys)
        assert torch.equal(dec_cache.values, ref_cache.values)


# Context lengths: 1, block boundaries (16, 32), one past (17, 33), one short (15), longer.
CTX_16 = [1, 16, 17, 2, 15, 33, 32, 100, 64, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 1, 5])
def test_sdpa_matches_paged_attention(dtype, block_size):
    check("sdpa", heads=4, head_size=32, block_size=block_size, ctx_lens=CTX_16, dtype=dtype)


@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_sdpa_pythia_head_sizes(head_size):
    check("sdpa", heads=2, head_size=head_size, block_size=16, ctx_lens=[1, 16, 17, 40], seed=3)


@pytest.mark.parametrize("num_padding", [1, 5])
def test_sdpa_padding_rows_leave_real_rows_and_cache_alone(num_padding):
    check(
        "sdpa", heads=4, head_size=32, block_size=16, ctx_lens=CTX_16[:5], num_padding=num_padding
    )


def test_only_padding_rows():
    """A batch of padding rows only (the start-up warm-up) touches nothing but scratch."""
    cache = make_cache(heads=2, head_size=16, block_size=4, num_blocks=6, dtype=torch.float32)
    before = clone_cache(cache)
    meta = DecodeMetadata(
        torch.full((3,), 5 * 4, dtype=torch.int64),
        torch.full((3, 4), 5, dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32),
    )
    q = torch.randn(3, 2, 1, 16, generator=torch.Generator().manual_seed(0))
    out = DecodeAttention(cache, meta, "sdpa").attend(0, q, q, q)
    assert torch.isfinite(out).all()
    assert torch.equal(cache.keys[:, :5], before.keys[:, :5])


def test_unknown_implementation_is_refused():
    cache = make_cache(heads=1, head_size=8, block_size=4, num_blocks=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="sdpa"):
        DecodeAttention(cache, DecodeMetadata(None, None, None), "flash")


# ---------------------------------------------------------------------------- Triton (interpreted)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@interpreted
def test_interpreted_triton_matches_paged_attention(dtype):
    check("triton", heads=2, head_size=32, block_size=16, ctx_lens=CTX_16[:7], dtype=dtype)


@pytest.mark.parametrize(
    ("head_size", "block_size"), [(64, 16), (80, 16), (128, 8), (256, 32), (80, 5), (64, 1)]
)
@interpreted
def test_interpreted_triton_head_and_block_sizes(head_size, block_size):
    """Pythia's head sizes (64: 70m-410m, 80: 2.8b, 128: 1.4b/6.9b/12b, 256: 1b); block sizes
    that are not powers of two are padded inside the kernel."""
    check(
        "triton",
        heads=2,
        head_size=head_size,
        block_size=block_size,
        ctx_lens=[1, block_size, block_size + 1, 70],
        seed=5,
    )


@interpreted
def test_interpreted_triton_padding_rows():
    ref, out, *_ = run_both(
        "triton",
        heads=2,
        head_size=32,
        block_size=16,
        ctx_lens=[1, 17, 33],
        dtype=torch.float32,
        num_padding=3,
    )
    torch.testing.assert_close(out[:3], ref)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))  # context 0: zeros, not NaN


@interpreted
def test_interpreted_triton_equals_sdpa_on_long_contexts():
    """Several loop iterations per sequence (64 tokens per iteration), mixed with short ones."""
    cache = make_cache(heads=2, head_size=64, block_size=16, num_blocks=40, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(9)
    tables = torch.randperm(39, generator=gen)[:36].view(3, 12).to(torch.int32)
    lens = torch.tensor([190, 1, 129], dtype=torch.int32)
    q = torch.randn(3, 2, 64, generator=gen).to(torch.bfloat16)
    a = da.triton_paged_decode(q, cache.keys[0], cache.values[0], tables, lens)
    b = da.sdpa_paged_decode(q, cache.keys[0], cache.values[0], tables, lens)
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_triton_kernel_runs_in_a_child_process():
    """The `interpreted` tests above, in a child process with TRITON_INTERPRET=1."""
    stdout = run_interpreted_child("tests/engine/test_decode_attention.py")
    assert "11 passed" in stdout, stdout[-3000:]
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_AT_IMPORT  # nothing leaked here


# ---------------------------------------------------------------------------- compiled, no GPU
STRIDES = [
    f"stride_{x}" for x in ("ob", "oh", "qb", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "bt")
]


@pytest.mark.parametrize(
    ("pointer", "head_size", "block_size"),
    [("*bf16", 128, 16), ("*fp32", 16, 16), ("*fp16", 80, 5)],
    ids=["pythia-6.9b-bf16", "tiny-fp32", "head-80-block-5"],
)
def test_kernel_compiles_for_hopper(pointer, head_size, block_size):
    """The kernel through Triton's whole compiler to an sm_90 (H100/H200) binary, ptxas
    included, on the CPU: the interpreter checks what it computes, not what only compiling
    checks (types of loop-carried values, constexpr arithmetic, shapes the hardware lays out).
    The constexprs are those `triton_paged_decode` passes."""
    if da.triton_interpreting() or importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton, compiling (not interpreting)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = da._kernel()
    block_pad = da._next_power_of_2(block_size)
    constexprs = {
        "HEAD_SIZE": head_size,
        "HEAD_PAD": da._next_power_of_2(head_size),
        "BLOCK_SIZE": block_size,
        "BLOCK_PAD": block_pad,
        "PAGES": max(1, 64 // block_pad),
    }
    pointers = {name: pointer for name in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")}
    signature = {
        **pointers,
        "block_tables_ptr": "*i32",
        "context_lens_ptr": "*i32",
        "scale": "fp32",
        **dict.fromkeys(STRIDES, "i32"),
        **dict.fromkeys(constexprs, "constexpr"),
    }
    assert list(signature) == kernel.arg_names
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]


# ---------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_compiled_triton_matches_sdpa_on_cuda(monkeypatch, dtype, head_size):
    if not da.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    heads, block_size, num_blocks = 8, 16, 600
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (num_blocks, block_size, heads, head_size)
    keys = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    values = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    lens = torch.tensor([1, 16, 17, 2048, 513, 0, 100, 999], dtype=torch.int32, device="cuda")
    tables = torch.randint(0, num_blocks, (8, 128), generator=gen, device="cuda").to(torch.int32)
    q = torch.randn(8, heads, head_size, generator=gen, device="cuda").to(dtype)
    a = da.triton_paged_decode(q, keys, values, tables, lens)
    b = da.sdpa_paged_decode(q, keys, values, tables, lens)
    real = lens > 0
    tol = TOL[dtype] if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(a[real].float(), b[real].float(), atol=tol, rtol=tol)
