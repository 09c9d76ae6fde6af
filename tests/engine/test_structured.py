"""Structured output (tulu.engine.structured): JSON schemas, JSON, regexes, choices, grammars.

The oracles: transformers' `generate` with xgrammar's own logits processor for transformers
(its mask-and-accept loop, not ours) must give the engine's greedy tokens, and every finished
completion must satisfy its constraint when checked by Python itself (`json`, `re`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch

from engine.conftest import CHOICES, GRAMMAR, LIST_GRAMMAR, REGEX, SCHEMA, satisfies
from helpers import hf_greedy
from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.engine.structured import StructuredOutput, grammar_compiler
from tulu.errors import GenerationError

xgrammar = pytest.importorskip("xgrammar", reason="structured output needs xgrammar")

pytestmark = pytest.mark.usefixtures("single_thread")


def _satisfies(spec: StructuredOutput, text: str) -> bool:
    return satisfies(spec.kind, getattr(spec, spec.kind), text)


#: Constraints a random model completes within MAX_TOKENS (a free-form JSON value would not).
BOUNDED = {
    "json-schema": StructuredOutput(json=SCHEMA),
    "json-schema-text": StructuredOutput(json=json.dumps(SCHEMA)),
    "regex": StructuredOutput(regex=REGEX),
    "choice": StructuredOutput(choice=CHOICES),
    "grammar": StructuredOutput(grammar=GRAMMAR),
}
MAX_TOKENS = 48


def _greedy(spec: StructuredOutput | None, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_output=spec, **extra)


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> list[list[int]]:
    texts = ["The cat sat on", "Hello there", "Numbers: 1, 2,", "<|user|>\nA color?\n"]
    return [demo_tokenizer.encode(t) for t in texts]


def _hf_greedy(hf, prompt: list[int], compiled, eos: int) -> list[int]:
    """transformers' greedy tokens under xgrammar's own processor, up to its EOS."""
    processor = xgrammar.contrib.hf.LogitsProcessor(compiled)
    return hf_greedy(hf, prompt, MAX_TOKENS, eos=eos, logits_processor=[processor])


# ----------------------------------------------------------------------------------------------
# Greedy parity with transformers + xgrammar's processor
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BOUNDED))
def test_greedy_matches_transformers_with_xgrammars_processor(
    name, tok_model, demo_tokenizer, hf_twin, make_llm, prompts
):
    spec = BOUNDED[name]
    llm = make_llm(tok_model, demo_tokenizer)
    # Constrained rows batched with an unconstrained one.
    params = [_greedy(spec), _greedy(None), _greedy(spec)]
    outputs = llm.generate(prompts[:3], params)
    eos = demo_tokenizer.eos_token_id
    grammars = grammar_compiler(demo_tokenizer, tok_model.config.vocab_size, eos)
    hf = hf_twin(tok_model)
    for prompt, output, p in zip(prompts[:3], outputs, params, strict=True):
        completion = output.outputs[0]
        if p.structured_output is None:
            assert completion.finish_reason == "length"
            continue
        assert completion.finish_reason == "stop" and completion.stop_reason == eos
        assert completion.token_ids[-1] == eos
        assert _satisfies(spec, completion.text), completion.text
        compiled = grammars.compile(spec)
        assert completion.token_ids == _hf_greedy(hf, prompt, compiled, eos)
        assert (
            completion.token_ids
            == generate_ids(tok_model, prompt, p, tokenizer=demo_tokenizer).token_ids
        )


def test_constraints_change_what_the_model_writes(tok_model, demo_tokenizer, make_llm, prompts):
    """Guard: unconstrained, the random model meets none of the constraints."""
    free = make_llm(tok_model, demo_tokenizer).generate(prompts[:1], _greedy(None))[0]
    text = free.outputs[0].text
    for spec in BOUNDED.values():
        try:
            assert not _satisfies(spec, text)
        except json.JSONDecodeError:
            pass


@pytest.mark.parametrize(
    "config",
    [dict(kv_cache_bytes=64 * 2 * 2 * 64 * 4, block_size=4), dict(max_num_batched_tokens=5)],
    ids=["preemption", "chunked-prefill"],
)
def test_preemption_and_chunking_keep_each_matcher_in_step(
    tok_model, demo_tokenizer, make_llm, prompts, config
):
    specs = [BOUNDED[name] for name in ("json-schema", "json-schema-text", "json-schema", "regex")]
    params = [_greedy(spec) for spec in specs]
    llm = make_llm(tok_model, demo_tokenizer, **config)
    outputs = llm.generate(prompts, params)
    if "kv_cache_bytes" in config:
        assert llm.engine.stats()["preemptions"] > 0
    for prompt, output, p in zip(prompts, outputs, params, strict=True):
        ref = generate_ids(tok_model, prompt, p, tokenizer=demo_tokenizer)
        assert output.outputs[0].token_ids == ref.token_ids
        assert _satisfies(p.structured_output, output.outputs[0].text)


# ----------------------------------------------------------------------------------------------
# Sampling, n > 1, ignore_eos, max_tokens, aborts
# ----------------------------------------------------------------------------------------------


def test_seeded_samples_meet_the_constraint_and_reproduce(
    tok_model, demo_tokenizer, make_llm, prompts
):
    spec = StructuredOutput(json=SCHEMA)
    params = SamplingParams(
        temperature=1.5, top_p=0.95, seed=11, n=4, max_tokens=MAX_TOKENS, structured_output=spec
    )
    llm = make_llm(tok_model, demo_tokenizer)
    first = llm.generate(prompts[3], params)[0].outputs
    again = llm.generate(prompts[3], params)[0].outputs
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    texts = [c.text for c in first]
    assert all(c.finish_reason == "stop" for c in first)
    assert all(_satisfies(spec, t) for t in texts), texts
    assert len(set(texts)) > 1  # the samples differ: sampling is not collapsed to greedy
    ref = generate_ids(tok_model, prompts[3], params, tokenizer=demo_tokenizer)
    assert first[0].token_ids == ref.token_ids  # sample 0 uses the seed itself


def test_a_complete_grammar_ends_the_completion_even_with_ignore_eos(
    tok_model, demo_tokenizer, make_llm, prompts
):
    spec = StructuredOutput(choice=CHOICES)
    out = make_llm(tok_model, demo_tokenizer).generate(prompts[0], _greedy(spec, ignore_eos=True))[
        0
    ]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.text in CHOICES
    assert len(completion.token_ids) < MAX_TOKENS


def test_max_tokens_cuts_an_unfinished_structure(tok_model, demo_tokenizer, make_llm, prompts):
    spec = StructuredOutput(json_object=True)
    out = make_llm(tok_model, demo_tokenizer).generate(
        prompts[0], SamplingParams(temperature=0, max_tokens=6, structured_output=spec)
    )[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 6
    assert completion.text.startswith("{")


def test_special_tokens_never_appear_inside_a_structure(
    tok_model, demo_tokenizer, make_llm, prompts
):
    """xgrammar is given the special tokens as empty, so it never allows them: a special token
    inside a JSON string would vanish from the text the client parses. A bias makes the model
    want <|padding|> (token 1) above everything: only the mask keeps it out."""
    padding = demo_tokenizer.token_to_id("<|padding|>")
    assert padding in demo_tokenizer.special_ids()
    spec = StructuredOutput(json_object=True)
    params = SamplingParams(
        temperature=0, max_tokens=24, logit_bias={padding: 30.0}, structured_output=spec
    )
    llm = make_llm(tok_model, demo_tokenizer)
    free = llm.generate(prompts[1], dataclasses.replace(params, structured_output=None))[0]
    assert set(free.outputs[0].token_ids) == {padding}  # the bias works
    completion = llm.generate(prompts[1], params)[0].outputs[0]
    assert padding not in completion.token_ids
    assert completion.text.startswith("{")


def test_a_grammar_that_reaches_a_dead_end_ends_the_completion_there(
    tok_model, demo_tokenizer, make_llm, prompts
):
    """After "a", the pattern a[^\\s\\S]|b allows no character: the row's every logit is -inf.
    The completion ends there ("stop", without the token sampled from nothing), and the other
    requests of the step go on: the engine must not fail."""
    dead_end = _greedy(
        StructuredOutput(regex=r"a[^\s\S]|b"), logit_bias={demo_tokenizer.encode("a")[0]: 50.0}
    )
    others = [_greedy(StructuredOutput(regex=REGEX)), _greedy(None)]
    outputs = make_llm(tok_model, demo_tokenizer).generate(prompts[:3], [dead_end, *others])
    completion = outputs[0].outputs[0]
    assert completion.text == "a" and completion.finish_reason == "stop"
    assert re.fullmatch(REGEX, outputs[1].outputs[0].text)
    assert len(outputs[2].outputs[0].token_ids) == MAX_TOKENS
    ref = generate_ids(tok_model, prompts[0], dead_end, tokenizer=demo_tokenizer)
    assert ref.token_ids == completion.token_ids and ref.finish_reason == "stop"


def test_the_eos_that_completes_a_grammar_is_never_text(
    tok_model, demo_tokenizer, make_llm, prompts
):
    """With ignore_eos the EOS is no stop token, and with skip_special_tokens False its text
    would be kept: the grammar's own end must still end the text before it."""
    spec = StructuredOutput(choice=CHOICES)
    params = _greedy(spec, ignore_eos=True, skip_special_tokens=False)
    completion = make_llm(tok_model, demo_tokenizer).generate(prompts[0], params)[0].outputs[0]
    assert completion.text in CHOICES and completion.finish_reason == "stop"
    assert generate_ids(tok_model, prompts[0], params, tokenizer=demo_tokenizer).token_ids == (
        completion.token_ids
    )


def test_aborting_a_structured_request_frees_everything(
    tok_model, demo_tokenizer, make_engine, drain
):
    engine = make_engine(tok_model, demo_tokenizer)
    engine.add_request("Hello", _greedy(StructuredOutput(json_object=True)), request_id="a")
    engine.add_request("Hi", _greedy(StructuredOutput(regex=REGEX)), request_id="b")
    engine.step()
    engine.step()
    engine.abort("a")
    outputs = drain(engine)
    assert re.fullmatch(REGEX, outputs["b"][-1].outputs[0].text)


FUZZ_CONSTRAINTS = [
    StructuredOutput(json=SCHEMA),
    StructuredOutput(regex=REGEX),
    StructuredOutput(regex=r"[a-e]{2,5}( [0-9]+)?\."),
    StructuredOutput(choice=CHOICES),
    StructuredOutput(choice=["é", "ü!", "x y z"]),
    StructuredOutput(grammar=GRAMMAR),
    StructuredOutput(grammar=LIST_GRAMMAR),
    None,
]


@pytest.mark.parametrize("seed", range(12))
def test_random_structured_workloads_match_the_reference(seed, tok_model, demo_tokenizer, make_llm):
    """Random batches of constrained, unconstrained, greedy and seeded-sampling requests (some
    n = 2), under random engine settings (tiny pools that preempt, chunked prefill, no prefix
    cache): every completion equals the reference generator's for its own request, and every
    finished constrained reply satisfies its constraint."""
    rng = random.Random(seed)
    texts = ["The cat", "Hello there", "Numbers: 1, 2,", "<|user|>\nA color?\n", "Why"]
    config = rng.choice(
        [
            {},
            dict(
                kv_cache_bytes=68 * 2 * 2 * 64 * 4, block_size=4
            ),  # most seeds that draw it preempt
            dict(max_num_batched_tokens=6),
            dict(enable_prefix_caching=False, block_size=2),
        ]
    )
    llm = make_llm(tok_model, demo_tokenizer, **config)
    prompts, params = [], []
    for _ in range(rng.randint(4, 8)):
        spec = rng.choice(FUZZ_CONSTRAINTS)
        sampled = rng.random() < 0.5
        params.append(
            SamplingParams(
                temperature=rng.choice([0.7, 1.3]) if sampled else 0,
                top_p=rng.choice([1.0, 0.9]),
                seed=rng.randrange(1000),
                n=rng.choice([1, 2]) if sampled else 1,
                max_tokens=rng.choice([8, 40]),
                structured_output=spec,
            )
        )
        prompts.append(rng.choice(texts) * rng.randint(1, 3))
    outputs = llm.generate(prompts, params)
    for prompt, output, p in zip(prompts, outputs, params, strict=True):
        ids = demo_tokenizer.encode(prompt)
        ref = generate_ids(tok_model, ids, p, tokenizer=demo_tokenizer)
        first = output.outputs[0]  # sample 0 uses the request's seed, as the reference does
        assert first.token_ids == ref.token_ids, (seed, prompt, p.structured_output)
        assert first.finish_reason == ref.finish_reason
        for completion in output.outputs:
            if p.structured_output is not None and completion.finish_reason == "stop":
                assert _satisfies(p.structured_output, completion.text), completion.text


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "set exactly one of json, json_object, regex, choice, grammar; got none"),
        (
            {"regex": "a", "choice": ["a"]},
            "set exactly one of json, json_object, regex, choice, grammar; got regex, choice",
        ),
        ({"choice": []}, "be a non-empty list of non-empty strings for choice, got []"),
        ({"choice": "yes"}, "be a list of strings for choice, got 'yes'"),
        (
            {"choice": ["a", ""]},
            "be a non-empty list of non-empty strings for choice, got ['a', '']",
        ),
        ({"regex": ""}, "be a non-empty string for regex, got ''"),
        ({"json": 5}, "be a JSON schema (an object or its JSON text) for json, got 5"),
        ({"json_object": 1}, "be a bool for json_object, got 1"),
    ],
)
def test_bad_specs_are_named(fields, message):
    with pytest.raises(GenerationError) as info:
        StructuredOutput(**fields)
    assert str(info.value) == "SamplingParams.structured_output must " + message


def test_sampling_params_take_a_dict_and_refuse_what_could_leave_no_token():
    params = SamplingParams(structured_output={"choice": ("a", "b")})
    assert params.structured_output == StructuredOutput(choice=("a", "b"))
    with pytest.raises(GenerationError, match=r"must be a StructuredOutput \(no field 'jsn'\)"):
        SamplingParams(structured_output={"jsn": {}})
    with pytest.raises(GenerationError, match="must be a StructuredOutput or a dict"):
        SamplingParams(structured_output="json")
    for extra in ({"min_tokens": 2}, {"allowed_token_ids": [1, 2]}):
        with pytest.raises(GenerationError, match="cannot be combined with structured_output"):
            SamplingParams(structured_output={"regex": "a"}, **extra)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutput(json="{not json"), r"structured_output\.json cannot be compiled: .*JSON"),
        (StructuredOutput(regex="[a-"), r"structured_output\.regex cannot be compiled: .*Unclosed"),
        (
            StructuredOutput(grammar="root ::= foo"),
            r"structured_output\.grammar cannot be compiled: .*Rule \"foo\" is not defined",
        ),
        (  # xgrammar nests a second C++ location inside this message
            StructuredOutput(json="[" * 20_000 + "]" * 20_000),
            r"structured_output\.json cannot be compiled: Failed to parse JSON: RecursionGuard",
        ),
        (StructuredOutput(regex=r"[^\s\S]"), r"structured_output\.regex matches no text"),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_when_added(
    spec, message, tok_model, demo_tokenizer, make_engine
):
    engine = make_engine(tok_model, demo_tokenizer)
    with pytest.raises(GenerationError, match=message) as info:
        engine.add_request("Hi", _greedy(spec))
    assert "/project/" not in str(info.value)  # xgrammar's C++ source locations are left out


def test_structured_output_needs_an_end_of_sequence_token(tok_model, demo_tokenizer, make_engine):
    """Without one a complete grammar would allow no token at all."""
    engine = make_engine(tok_model, demo_tokenizer)
    engine.eos_token_id = None
    with pytest.raises(GenerationError, match="needs an end-of-sequence token"):
        engine.add_request("Hi", _greedy(StructuredOutput(regex="a")))


def test_structured_output_needs_a_tokenizer(tiny_model, make_engine):
    engine = make_engine(tiny_model)
    with pytest.raises(GenerationError, match="structured_output needs a tokenizer"):
        engine.add_request([1, 2, 3], _greedy(StructuredOutput(regex="a")))


def test_without_xgrammar_the_error_says_what_to_install(
    tok_model, demo_tokenizer, make_engine, monkeypatch
):
    import sys

    from tulu.engine import structured

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    structured.grammar_compiler.cache_clear()
    try:
        engine = make_engine(tok_model, demo_tokenizer)
        with pytest.raises(GenerationError, match=r"needs the xgrammar package: pip install"):
            engine.add_request("Hi", _greedy(StructuredOutput(regex="a")))
    finally:
        structured.grammar_compiler.cache_clear()


# ----------------------------------------------------------------------------------------------
# GPU (benchmarks/device_check.py carries xgrammar's wheels to the GPU machine)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_cuda_match_the_reference_and_hold(tok_model, demo_tokenizer, make_llm, prompts):
    """xgrammar's CUDA kernel applies the masks there: the engine's batched greedy tokens on
    the GPU must equal the reference generator's on the GPU, and every reply hold."""
    import copy

    model = copy.deepcopy(tok_model).to("cuda")
    specs = [BOUNDED[name] for name in ("json-schema", "regex", "choice", "grammar")]
    params = [_greedy(spec) for spec in specs]
    outputs = make_llm(model, demo_tokenizer, kv_cache_bytes=64 << 20).generate(prompts, params)
    for prompt, output, p in zip(prompts, outputs, params, strict=True):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop" and _satisfies(
            p.structured_output, completion.text
        )
        ref = generate_ids(model, prompt, p, tokenizer=demo_tokenizer)
        assert completion.token_ids == ref.token_ids
