"""LLMEngine: requests in, token/text deltas out, one batched forward pass per step.

`add_request` validates and queues; `step` asks the scheduler what to run, runs all of it as
one flat batch over the paged KV cache, samples the sequences whose prompt is fully computed,
applies stop conditions and returns a `RequestOutput` for every request that moved. `abort`
frees a request's blocks at once. `LLM.generate` is the blocking convenience wrapper.

Decode-only steps can take a fast path (`EngineConfig.decode_attention` / `cuda_graphs`): the
`DecodeGraphRunner` of `tulu.engine.cuda_graphs`, graph-safe attention and, on CUDA, decode
steps replayed as CUDA graphs captured at start-up. On CPU the default is the general path.

With `lora_modules`, requests may name an unmerged LoRA adapter (`tulu.engine.lora`); a step
mixes rows of different adapters, and the prefix cache keeps each adapter's blocks apart.

With `EngineConfig.speculative`, a decoding sequence's step may also compute proposed tokens
(`tulu.engine.speculative`); `_sample_and_update` keeps those the model agrees with, then the
cache holds every kept token and the blocks taken for refused ones are given back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tulu.chat import generation_prompt
from tulu.engine.attention import PagedAttention, StepLayout
from tulu.engine.cuda_graphs import DecodeGraphRunner
from tulu.engine.decode_attention import triton_available, triton_interpreting
from tulu.engine.kv_cache import BlockPool, KVCacheSpec, PagedKVCache, plan_kv_cache
from tulu.engine.lora import LoraAdapters
from tulu.engine.options import DECODE_ATTENTION_CHOICES
from tulu.engine.output import IncrementalOutput
from tulu.engine.reference import TokenLogprob
from tulu.engine.sampling import (
    SamplingParams,
    SamplingTensors,
    bad_word_bans,
    bad_word_token_ids,
    candidate_logprobs,
    check_bad_words_leave_a_token,
    check_min_tokens_reachable,
    check_token_ids_in_vocab,
    compute_logprobs,
    make_generator,
    mask_tokens,
    prepare_sampling_tensors,
    sample,
    sample_with_drafts,
)
from tulu.engine.scheduler import ScheduledSeq, Scheduler, Sequence
from tulu.engine.speculative import SpeculativeConfig, propose_ngram, speculates
from tulu.engine.structured import StructuredOutput, apply_grammar_masks, matchers_for
from tulu.errors import GenerationError, TuluError
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict[str, Any]]

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Sizes of the KV cache and of each step."""

    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: a fraction of free GPU memory, or 16 contexts on CPU
    gpu_memory_fraction: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 on CPU, 8192 on GPU
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # The longest sequence (prompt + output) a request may have. None: the model's context
    # window (max_position_embeddings); a smaller value caps requests as vLLM's max_model_len.
    max_model_len: int | None = None
    # Decode fast path (see docs/engine.md). "loop": the per-sequence PagedAttention for every
    # step; "sdpa"/"triton": decode-only steps run through the static-buffer DecodeGraphRunner
    # with that graph-safe attention; "auto": "triton" on CUDA when importable, else "loop".
    # The default stays "loop" until the GPU paths have been run on a GPU (none so far).
    decode_attention: str = "loop"
    cuda_graphs: bool | None = None  # None: on for CUDA when decode_attention is not "loop"
    # Largest decode batch served by the fast path (larger ones take the loop path). None:
    # 256 with Triton; 32 with SDPA, which gathers the whole context window for every row.
    max_graph_batch_size: int | None = None
    # N-gram speculative decoding (`tulu.engine.speculative`, vLLM's speculative_config with
    # method "ngram"); None: off. Requests land several tokens per step when their text
    # repeats its context: greedy ones with their output unchanged, unseeded sampled ones
    # with their distribution unchanged.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        optional = ("max_num_batched_tokens", "kv_cache_bytes", "max_model_len")
        for name in ("block_size", "max_num_seqs", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GenerationError(
                    f"EngineConfig.{name} must be a positive integer, got {value!r}"
                )
        # Switches: a string such as "false" (from a config file) would be truthy.
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "cuda_graphs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "cuda_graphs"):
                raise GenerationError(f"EngineConfig.{name} must be True or False, got {value!r}")
        fraction = self.gpu_memory_fraction
        if (
            not isinstance(fraction, (int, float))
            or isinstance(fraction, bool)
            or not 0 < fraction <= 1
        ):
            raise GenerationError(
                f"EngineConfig.gpu_memory_fraction must be in (0, 1], got {fraction!r}"
            )
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise GenerationError(
                f"EngineConfig.speculative must be a SpeculativeConfig or None, got "
                f"{type(self.speculative).__name__}"
            )
        if self.decode_attention not in DECODE_ATTENTION_CHOICES:
            raise GenerationError(
                f"EngineConfig.decode_attention must be one of {', '.join(DECODE_ATTENTION_CHOICES)}, "
                f"got {self.decode_attention!r}"
            )
        if self.max_graph_batch_size is not None and (
            not isinstance(self.max_graph_batch_size, int)
            or isinstance(self.max_graph_batch_size, bool)
            or self.max_graph_batch_size < 1
        ):
            raise GenerationError(
                f"EngineConfig.max_graph_batch_size must be a positive integer, got "
                f"{self.max_graph_batch_size!r}"
            )


@dataclass
class CompletionOutput:
    """One sampled continuation. `text`/`token_ids` are cumulative; `delta_*` are new this step."""

    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    candidate_logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt tokens the prefix cache served the request when first admitted (vLLM's meaning):
    # not blocks a preempted request finds again, nor those its samples share with each other.
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    completions: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # The token ids that end its completions (stop_token_ids, and EOS unless ignored), as a
    # set made once: every generated token is checked against it.
    stop_ids: frozenset[int] = frozenset()

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self,
        model: GPTNeoXForCausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        lora_modules: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        enable_lora: bool = False,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Unmerged LoRA adapters a request may name (`add_request(..., lora=name)`); with
        # `enable_lora`, also none at first, for `load_lora` later.
        lora_on = bool(lora_modules) or enable_lora
        self.lora = LoraAdapters(model, lora_modules or {}) if lora_on else None
        self._retired_lora_slots: set[int] = set()  # unloaded, still used by some request
        if self.lora is not None and resolve_fast_path(self.config, self.device)[0] != "loop":
            # The fast path's static buffers and graphs fix the rows of a step; adapter rows
            # change from step to step.
            logger.warning(
                "LoRA adapters are loaded: the decode fast path (%s) is off",
                self.config.decode_attention,
            )
            self.config = dataclasses.replace(
                self.config, decode_attention="loop", cuda_graphs=False
            )
        self.model_config = model.config
        window = model.config.max_position_embeddings
        if self.config.max_model_len is not None and self.config.max_model_len > window:
            raise GenerationError(
                f"EngineConfig.max_model_len is {self.config.max_model_len}, beyond the model's "
                f"context window of {window} tokens (max_position_embeddings)"
            )
        self.max_model_len = self.config.max_model_len or window
        spec = plan_kv_cache(
            model.config,
            self.dtype,
            self.device,
            self.config.block_size,
            self.config.kv_cache_bytes,
            self.config.gpu_memory_fraction,
        )
        self.decode_attention, self.cuda_graphs = resolve_fast_path(self.config, self.device)
        fast = self.decode_attention != "loop"
        # The fast path pads batches with rows that write to a scratch block outside the pool.
        cache_spec = KVCacheSpec(spec.num_blocks + 1, spec.block_size) if fast else spec
        self.cache = PagedKVCache(model.config, cache_spec, self.dtype, self.device)
        self.pool = BlockPool(spec.num_blocks, spec.block_size, self.config.enable_prefix_caching)
        budget = self.config.max_num_batched_tokens or (
            8192 if self.device.type == "cuda" else 2048
        )
        self.scheduler = Scheduler(
            self.pool,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=self.config.enable_chunked_prefill,
            propose=self._propose if self.config.speculative is not None else None,
        )
        # Speculative decoding's counts: tokens proposed, and proposals the model agreed with.
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.eos_token_id = (
            tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        )
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        # Decode fast path: built, warmed up and (on CUDA) captured once, here.
        self.decode_runner: DecodeGraphRunner | None = None
        self.decode_warmup_seconds: float | None = None
        if fast:
            self.decode_runner = DecodeGraphRunner(
                self.model,
                self.cache,
                max_batch_size=min(
                    self.config.max_graph_batch_size
                    or (256 if self.decode_attention == "triton" else 32),
                    self.config.max_num_seqs,
                ),
                max_model_len=self.max_model_len,
                scratch_block=spec.num_blocks,
                attention=self.decode_attention,
                use_graphs=self.cuda_graphs,
            )
            self.decode_warmup_seconds = self.decode_runner.capture()
            logger.info(
                "decode fast path: %s attention, CUDA graphs %s, batch sizes up to %d; "
                "warm-up%s took %.2f s",
                self.decode_attention,
                "on" if self.cuda_graphs else "off",
                self.decode_runner.max_batch_size,
                " and capture" if self.cuda_graphs else "",
                self.decode_warmup_seconds,
            )

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Text (used as is), token ids, or chat messages (rendered in the Tulu format).

        Every id is checked against the model's vocabulary; the tokenizer's only when it has
        more tokens than the model has embeddings, which would otherwise crash the step (and
        every request in it) with an IndexError."""
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str) or (
            isinstance(prompt, (list, tuple))
            and prompt
            and all(isinstance(m, dict) for m in prompt)
        ):
            if self.tokenizer is None:
                kind = "text" if isinstance(prompt, str) else "chat"
                raise GenerationError(f"{kind} prompts need a tokenizer")
            if not isinstance(prompt, str):
                prompt = generation_prompt(list(prompt), self.tokenizer.eos_token)
            ids = self.tokenizer.encode(prompt)
            bad = [t for t in ids if t >= vocab] if self.tokenizer.vocab_size > vocab else []
            if bad:
                raise GenerationError(
                    f"the tokenizer gives token id {bad[0]}, outside the model's vocabulary "
                    f"[0, {vocab}): the tokenizer does not belong to this model"
                )
            return ids
        if isinstance(prompt, (list, tuple)) and all(_is_token_id(t) for t in prompt):
            ids = [int(t) for t in prompt]  # numpy integers too (an array's list() gives them)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
                )
            return ids
        raise GenerationError(
            "a prompt must be a string, a list of token ids, or a list of chat messages"
        )

    def _lora_slot(self, lora: str | None) -> int:
        if lora is None:
            return 0
        if not isinstance(lora, str):
            raise GenerationError(f"lora must be an adapter name, got {type(lora).__name__}")
        if self.lora is None:
            raise GenerationError(f"lora: no adapter named {lora!r} (no adapters are loaded)")
        return self.lora.slot(lora)

    def load_lora(self, name: str, directory: str | os.PathLike[str]) -> None:
        """Add adapter `name` at run time (an engine made with `enable_lora` or adapters)."""
        self._lora_enabled().install(self._lora_enabled().read(name, directory))

    def unload_lora(self, name: str) -> None:
        """Remove adapter `name` at once for new requests (the name may be loaded again); the
        requests already running or waiting with it finish with it, as in vLLM, and its
        weights are freed after the last of them."""
        self._retired_lora_slots.add(self._lora_enabled().unload(name))
        self._free_retired_lora()

    def _free_retired_lora(self) -> None:
        """Free the weights of unloaded adapters that no unfinished request uses any more."""
        if not self._retired_lora_slots or self.lora is None:
            return
        in_use = {s.lora_slot for r in self._requests.values() for s in r.seqs}
        for slot in self._retired_lora_slots - in_use:
            self.lora.forget(slot)
            self._retired_lora_slots.discard(slot)

    def _lora_enabled(self) -> LoraAdapters:
        if self.lora is None:
            raise GenerationError(
                "lora: LoRA is not enabled on this engine (make it with enable_lora=True or "
                "lora_modules)"
            )
        return self.lora

    @property
    def window_name(self) -> str:
        """What limits a request's length, for error messages: the model's context window,
        or a smaller max_model_len."""
        capped = self.max_model_len < self.model_config.max_position_embeddings
        return "the max_model_len" if capped else "the model's context window"

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse requests that could never run, instead of queueing them forever."""
        if num_prompt_tokens == 0:
            raise GenerationError("the prompt is empty (0 tokens)")
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise GenerationError(
                f"the prompt has {num_prompt_tokens} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens exceed {self.window_name} of {self.max_model_len} tokens"
            )
        # The last generated token is sampled but never fed back, so it needs no KV slot.
        needed = total - 1
        capacity = self.pool.num_blocks * self.pool.block_size
        if needed > capacity:
            raise GenerationError(
                f"the request needs {needed} tokens of KV cache but the whole cache holds "
                f"{capacity} tokens"
            )

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        lora: str | None = None,
    ) -> str:
        """Queue a request; `lora` names one of the engine's adapters (None: the base)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params must be SamplingParams, got {type(params).__name__}")
        lora_slot = self._lora_slot(lora)
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise GenerationError(f"request id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")
        check_token_ids_in_vocab(
            params,
            self.model_config.vocab_size,
            len(self.tokenizer) if self.tokenizer is not None else None,
        )
        check_min_tokens_reachable(params, self.eos_token_id)
        matchers = self._grammar_matchers(params)
        bad_words = bad_word_token_ids(
            params.bad_words, self.tokenizer, self.model_config.vocab_size
        )
        check_bad_words_leave_a_token(params, bad_words, self.eos_token_id)
        prompt_ids = self.encode_prompt(prompt)
        self.check_fits(len(prompt_ids), params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                params=params,
                arrival=arrival,
                generator=make_generator(sample_seed(params.seed, index), self.device),
                lora_slot=lora_slot,
                lora_salt=self.lora.salt(lora_slot)
                if self.lora is not None and lora_slot
                else None,
                grammar=matchers[index] if matchers else None,
                bad_words=bad_words,
            )
            if self.tokenizer is not None:
                seq.output = IncrementalOutput(
                    self.tokenizer,
                    prompt_ids,
                    params.stop,
                    include_stop=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                    min_tokens=params.min_tokens,
                )
            seqs.append(seq)
        completions = [
            CompletionOutput(
                i,
                "",
                [],
                logprobs=[] if params.logprobs is not None else None,
                candidate_logprobs=[] if params.candidate_token_ids else None,
            )
            for i in range(params.n)
        ]
        request = _Request(
            request_id,
            prompt_ids,
            params,
            seqs,
            arrival,
            completions,
            stop_ids=frozenset(self._stop_ids(seqs[0])),
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first prompt token has no prediction
        if any(o.request_id == request_id for o in self._aborted):
            # An aborted request's notice not yet returned by step() (abort() returned it
            # already): reported after this, it would end the new request of this id for
            # whoever reads step()'s outputs by id (LLM.generate retried with request_ids).
            self._aborted = [o for o in self._aborted if o.request_id != request_id]
        self._requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored.

        The notice returned is also returned by the next step(), unless a new request takes
        the id before that step."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self._free_retired_lora()
        for seq, completion in zip(request.seqs, request.completions, strict=True):
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = completion.finish_reason = "abort"
            completion.delta_text, completion.delta_token_ids = "", []
        request.finished_time = time.monotonic()
        output = self._request_output(request)
        self._aborted.append(output)  # also reported by the next step(), like any finished request
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def has_pending_outputs(self) -> bool:
        """Abort notices not yet returned by step()."""
        return bool(self._aborted)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        aborted, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return aborted
        tokens: list[int] = []
        positions: list[int] = []
        # Each sampled sequence with its drafts, and the query rows whose logits it samples
        # (its last one; with drafts, one more per draft).
        sample_seqs: list[tuple[Sequence, list[int]]] = []
        sample_rows: list[int] = []
        prompt_logprob_rows: list[tuple[Sequence, int, int]] = []
        for item in plan.scheduled:
            seq, count, drafts = item.seq, item.num_new_tokens, item.draft_token_ids
            start = seq.num_computed
            q_start = len(tokens)
            tokens.extend(seq.token_ids[start : start + count - len(drafts)])
            tokens.extend(drafts)
            positions.extend(range(start, start + count))
            if start + count - len(drafts) == seq.num_tokens:
                sample_seqs.append((seq, drafts))
                sample_rows.extend(range(q_start + count - 1 - len(drafts), q_start + count))
            if (
                seq.params.prompt_logprobs is not None
                and seq.index == 0
                and start < seq.num_prompt_tokens
            ):
                end = min(start + count, seq.num_prompt_tokens)
                prompt_logprob_rows.append((seq, q_start, end - start))

        runner = self.decode_runner
        if (
            runner is not None
            and len(sample_seqs) == len(plan.scheduled) == len(tokens) <= runner.max_batch_size
            and not prompt_logprob_rows
        ):
            # Decode-only step (one token per sequence, every one sampled): the fast path.
            logits = runner.run(
                tokens, positions, [item.seq.block_table for item in plan.scheduled]
            ).float()
            hidden = None
        else:
            # Slots and per-sequence layouts are built only here: the fast path derives its own.
            layout = StepLayout.build(self.cache, *self._step_slots(plan.scheduled))
            input_ids = torch.tensor([tokens], device=self.device)
            position_ids = torch.tensor([positions], device=self.device)
            if self.lora is not None:
                self.lora.use(
                    [
                        item.seq.lora_slot
                        for item in plan.scheduled
                        for _ in range(item.num_new_tokens)
                    ],
                    self.device,
                )
            try:
                hidden = self.model.hidden_states(
                    input_ids, position_ids, backend=PagedAttention(self.cache, layout)
                )[0]
            finally:
                if self.lora is not None:
                    # Another engine may run this model next: its rows are not these.
                    self.lora.use((), self.device)
        for item in plan.scheduled:
            # Drafts are computed but not yet known to be right: counted once verified.
            item.seq.num_computed += item.num_new_tokens - len(item.draft_token_ids)
            self.scheduler.register_computed_blocks(item.seq)
        for seq, q_start, count in prompt_logprob_rows:
            self._record_prompt_logprobs(seq, hidden, q_start, count)

        touched: dict[str, _Request] = {}
        if sample_seqs:
            if hidden is not None:
                rows = torch.tensor(sample_rows, device=self.device)
                logits = self.model.embed_out(hidden[rows]).float()
            self._sample_and_update(sample_seqs, logits, touched)
        outputs = aborted
        for request in touched.values():
            output = self._request_output(request)
            outputs.append(output)
            if output.finished:
                del self._requests[request.request_id]
        self._free_retired_lora()
        return outputs

    def _step_slots(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[list[int], list[tuple[int, int, int, list[int]]]]:
        """The flat cache slot of each of the step's tokens, and each sequence's
        (q_start, q_end, context_len, block_table), for `StepLayout.build`.

        A sequence's new tokens occupy consecutive positions, so its slots are runs within
        consecutive blocks: built a block at a time (`range` over the block's rows), not a
        division per token, which matters for prefill chunks of thousands of tokens.
        """
        bs = self.pool.block_size
        slots: list[int] = []
        layout: list[tuple[int, int, int, list[int]]] = []
        for item in scheduled:
            seq, count = item.seq, item.num_new_tokens
            start, end, table = seq.num_computed, seq.num_computed + count, seq.block_table
            q_start = len(slots)
            position = start
            while position < end:
                block, row = divmod(position, bs)
                run = min(bs - row, end - position)
                base = table[block] * bs
                slots.extend(range(base + row, base + row + run))
                position += run
            layout.append((q_start, q_start + count, end, table))
        return slots, layout

    def _sample_and_update(
        self,
        sampled: list[tuple[Sequence, list[int]]],
        logits: torch.Tensor,
        touched: dict[str, _Request],
    ) -> None:
        """Sample each sequence's rows of `logits` and append the tokens it keeps.

        A sequence without drafts has one row. One with drafts has a row per draft more, the
        row before each draft predicting it: its tokens are the model's picks, row by row, for
        as long as each pick equals the draft it checks (so the pick after the last kept draft,
        or after all of them, is the model's own next token). A greedy pick is the argmax; a
        sampled sequence's drafts go through speculative sampling (`sample_with_drafts`),
        whose picks are the kept drafts and one token after them."""
        rows: list[Sequence] = []  # the sequence of each row
        offsets: list[int] = []  # each row's place among its sequence's rows
        drafted: list[tuple[int, Sequence, list[int]]] = []  # sampled with drafts: first row
        for seq, drafts in sampled:
            if drafts and not seq.params.is_greedy:
                drafted.append((len(rows), seq, drafts))
            rows.extend([seq] * (len(drafts) + 1))
            offsets.extend(range(len(drafts) + 1))
        params = [s.params for s in rows]
        raw = logits
        matchers = [s.grammar for s in rows]
        if any(m is not None for m in matchers):
            logits = apply_grammar_masks(logits, matchers)
        # min_tokens: the stop tokens are masked at each row whose token would come too early;
        # bad words: their last tokens where the output ends with the rest (such a request
        # never speculates, so its one row is offset 0).
        blocked: list[list[int] | None] = []
        for s, offset in zip(rows, offsets, strict=True):
            banned = self._stop_ids(s) if s.num_output_tokens + offset < s.params.min_tokens else []
            if s.bad_words:
                # Only the last tokens can complete a word: not the whole output every step.
                tail = max(s.num_prompt_tokens, s.num_tokens - max(map(len, s.bad_words)) + 1)
                banned = [*banned, *bad_word_bans(s.token_ids[tail:], s.bad_words)]
            blocked.append(banned or None)
        if any(b for b in blocked):
            logits = mask_tokens(logits, blocked)
        chosen: torch.Tensor | None = None
        if drafted:
            chosen_list = self._sample_drafted(logits, rows, drafted)
        else:
            tensors = self._sampling_tensors(rows, logits.shape[-1])
            chosen = sample(logits, tensors, [s.generator for s in rows])
            chosen_list = chosen.tolist()
        want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        top_n = max(want_logprobs, default=None)
        logprobs = None
        if top_n is not None:
            if chosen is None:
                chosen = torch.tensor(chosen_list, device=self.device)
            chosen_lp, top_ids, top_lp = compute_logprobs(raw, chosen, top_n)
            logprobs = (chosen_lp.tolist(), top_ids.tolist(), top_lp.tolist())
        now = time.monotonic()
        row = 0
        for seq, drafts in sampled:
            request = self._requests[seq.request_id]
            if request.first_token_time is None:
                request.first_token_time = now
            touched[request.request_id] = request
            for offset in range(len(drafts) + 1):
                token = chosen_list[row + offset]
                agreed = offset < len(drafts) and token == drafts[offset]
                self.num_accepted_tokens += agreed  # counted even when it ends the completion
                if not self._append_token(seq, request, token, row + offset, raw, logprobs):
                    break
                if not agreed:
                    break
            self.num_draft_tokens += len(drafts)
            row += len(drafts) + 1
            if seq.is_finished:
                if request.finished:
                    request.finished_time = now
            elif drafts:
                # The kept drafts' keys and values are right: the cache holds every token
                # but the last, as after any decode step.
                seq.num_computed = seq.num_tokens - 1
                self.scheduler.register_computed_blocks(seq)
                self.scheduler.release_unused_blocks(seq)

    def _sampling_tensors(self, rows: list[Sequence], vocab_size: int) -> SamplingTensors:
        """The rows' sampling parameters as tensors (with token histories when a row uses
        penalties)."""
        params = [s.params for s in rows]
        if not any(p.uses_penalties for p in params):
            return prepare_sampling_tensors(params, self.device)
        return prepare_sampling_tensors(
            params,
            self.device,
            vocab_size=vocab_size,
            prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in rows],
            output_token_ids=[s.output_ids for s in rows],
        )

    def _sample_drafted(
        self,
        logits: torch.Tensor,
        rows: list[Sequence],
        drafted: list[tuple[int, Sequence, list[int]]],
    ) -> list[int]:
        """Each row's pick when some sampled sequences have drafts: theirs from speculative
        sampling (the kept drafts and one token, in their first rows; the rest unused), the
        other rows from `sample` as usual."""
        # The drafted rows, group after group, go through one batched speculative sampling.
        order = [first + i for first, _, drafts in drafted for i in range(len(drafts) + 1)]
        special = set(order)
        plain = [i for i in range(len(rows)) if i not in special]
        picks = [0] * len(rows)
        if plain:
            index = torch.tensor(plain, device=self.device)
            chosen = sample(
                logits.index_select(0, index),
                self._sampling_tensors([rows[i] for i in plain], logits.shape[-1]),
                [rows[i].generator for i in plain],
            )
            for i, token in zip(plain, chosen.tolist(), strict=True):
                picks[i] = token
        params = [seq.params for _, seq, drafts in drafted for _ in range(len(drafts) + 1)]
        groups = sample_with_drafts(
            logits.index_select(0, torch.tensor(order, device=self.device)),
            prepare_sampling_tensors(params, self.device),
            [drafts for _, _, drafts in drafted],
        )
        for (first, _, _), tokens in zip(drafted, groups, strict=True):
            picks[first : first + len(tokens)] = tokens
        return picks

    def _append_token(
        self,
        seq: Sequence,
        request: _Request,
        token: int,
        row: int,
        raw: torch.Tensor,
        logprobs: tuple[list, list, list] | None,
    ) -> bool:
        """Append a sampled token to `seq` (log-probabilities from `row` of the raw logits),
        check its stop conditions; False once the sequence has finished."""
        completion = request.completions[seq.index]
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # Its grammar allowed no token at all (a pattern with a dead end, such as
            # a[^\s\S]|b after "a"), so the row was all -inf: the completion ends here,
            # without the token.
            self._finish(seq, completion, "stop", None)
            return False
        seq.token_ids.append(token)
        completion.token_ids.append(token)
        completion.delta_token_ids.append(token)
        if seq.params.logprobs is not None:
            chosen_lp, top_ids, top_lp = logprobs
            k = seq.params.logprobs
            completion.logprobs.append(
                TokenLogprob(
                    token, chosen_lp[row], list(zip(top_ids[row][:k], top_lp[row][:k], strict=True))
                )
            )
        if seq.params.candidate_token_ids:
            values = candidate_logprobs(raw[row], seq.params.candidate_token_ids).tolist()
            completion.candidate_logprobs.append(
                dict(zip(seq.params.candidate_token_ids, values, strict=True))
            )
        self._check_stop(seq, token, completion, request.stop_ids)
        return not seq.is_finished

    def _propose(self, seq: Sequence) -> list[int]:
        """A decoding sequence's draft tokens (n-gram lookup in its own tokens): none for a
        request that may not speculate (`speculates`), none while `disable_by_batch_size`
        sequences run, and never more than it may still generate beyond the one token each
        step makes anyway."""
        config = self.config.speculative
        if not speculates(seq.params) or (
            config.disable_by_batch_size is not None
            and len(self.scheduler.running) >= config.disable_by_batch_size
        ):
            return []
        room = seq.params.max_tokens - seq.num_output_tokens - 1
        return propose_ngram(seq.token_ids, config, room, seq.token_bytes)

    def _grammar_matchers(self, params: SamplingParams) -> list[Any] | None:
        """One matcher per sample of the params' structured_output (each holds its own place in
        the grammar), or None. The grammar comes from the compiler's cache when the server has
        compiled it already, off its event loop."""
        if params.structured_output is None:
            return None
        return matchers_for(
            params.structured_output,
            params.n,
            self.tokenizer,
            self.model_config.vocab_size,
            self.eos_token_id,
        )

    def compile_structured_output(self, spec: StructuredOutput) -> None:
        """Compile `spec` for this engine's model (GenerationError when it does not compile,
        matches no text, or the engine has no tokenizer); done ahead of `add_request` by the
        server, off its event loop, and by `tulu generate` before any prompt runs."""
        matchers_for(spec, 0, self.tokenizer, self.model_config.vocab_size, self.eos_token_id)

    def _stop_ids(self, seq: Sequence) -> list[int]:
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _check_stop(
        self, seq: Sequence, token: int, completion: CompletionOutput, stop_ids: frozenset[int]
    ) -> None:
        finish, reason = None, None
        # A complete grammar has just taken the EOS: a stop, even with ignore_eos.
        grammar_done = seq.grammar is not None and seq.grammar.is_terminated()
        if token in stop_ids or grammar_done:
            finish, reason = "stop", token
            if seq.output is not None and seq.params.include_stop_str_in_output:
                # As vLLM: the stop token's own text is kept when the stop text is asked for.
                completion.delta_text += seq.output.push(token)
        elif seq.output is not None:
            delta = seq.output.push(token)
            completion.delta_text += delta
            if seq.output.stopped_by is not None:
                finish, reason = "stop", seq.output.stopped_by
        if finish is None and seq.num_output_tokens >= seq.params.max_tokens:
            finish = "length"
        if finish is None:
            completion.text = seq.output.text if seq.output is not None else ""
            return
        self._finish(seq, completion, finish, reason)

    def _finish(
        self, seq: Sequence, completion: CompletionOutput, finish: str, reason: str | int | None
    ) -> None:
        """End `seq`: release its held-back text, record why, free its blocks."""
        if seq.output is not None:
            completion.delta_text += seq.output.finish()
            completion.text = seq.output.text
            if finish == "length" and seq.output.stopped_by is not None:
                # The text held back for an incomplete character, released at the end,
                # completed a stop string: the text is cut there, so it stopped (as the
                # reference generator reports it).
                finish, reason = "stop", seq.output.stopped_by
        seq.finish_reason, seq.stop_reason = finish, reason
        completion.finish_reason, completion.stop_reason = finish, reason
        self.scheduler.remove(seq)

    def _record_prompt_logprobs(
        self, seq: Sequence, hidden: torch.Tensor, q_start: int, count: int
    ) -> None:
        """Log-probabilities of prompt tokens 1.. given their prefixes, chunk by chunk.

        The hidden state at position p predicts token p + 1. Positions already scored (a
        recompute after preemption) are skipped.
        """
        scored = self._requests[seq.request_id].prompt_logprobs
        first = seq.num_computed - count  # absolute position of the chunk's first token
        begin = max(first, len(scored) - 1)
        end = min(first + count, seq.num_prompt_tokens - 1)
        if end <= begin:
            return
        rows = hidden[q_start + (begin - first) : q_start + (end - first)]
        logits = self.model.embed_out(rows).float()
        targets = torch.tensor(seq.token_ids[begin + 1 : end + 1], device=self.device)
        chosen, top_ids, top_lp = compute_logprobs(logits, targets, seq.params.prompt_logprobs)
        for j, target in enumerate(targets.tolist()):
            top = list(zip(top_ids[j].tolist(), top_lp[j].tolist(), strict=True))
            scored.append(TokenLogprob(target, float(chosen[j]), top))

    def _request_output(self, request: _Request) -> RequestOutput:
        outputs = []
        for completion in request.completions:
            outputs.append(
                CompletionOutput(
                    completion.index,
                    completion.text,
                    list(completion.token_ids),
                    completion.delta_text,
                    completion.delta_token_ids,
                    completion.finish_reason,
                    completion.stop_reason,
                    list(completion.logprobs) if completion.logprobs is not None else None,
                    list(completion.candidate_logprobs)
                    if completion.candidate_logprobs is not None
                    else None,
                )
            )
            completion.delta_text, completion.delta_token_ids = "", []
        return RequestOutput(
            request.request_id,
            request.prompt_ids,
            outputs,
            request.finished,
            list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            # Sample 0 is admitted first (the samples queue in order): its lookup is the request's.
            request.seqs[0].num_cached_prompt_tokens,
            request.arrival,
            request.first_token_time,
            request.finished_time,
        )

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_used": self.pool.num_used,
            "kv_blocks_cached": self.pool.num_cached,
            "prefix_cache_queries": self.scheduler.prefix_queries,
            "prefix_cache_hits": self.scheduler.prefix_hits,
            "prefix_cache_hit_rate": (
                self.scheduler.prefix_hits / self.scheduler.prefix_queries
                if self.scheduler.prefix_queries
                else 0.0
            ),
            "preemptions": self.scheduler.num_preemptions,
            "spec_decode_draft_tokens": self.num_draft_tokens,
            "spec_decode_accepted_tokens": self.num_accepted_tokens,
            "lora_adapters": len(self.lora.loaded) if self.lora is not None else 0,
        }


def resolve_fast_path(config: EngineConfig, device: torch.device) -> tuple[str, bool]:
    """(decode attention, CUDA graphs on) for this config on this device.

    "auto" is "triton" on CUDA when Triton imports, else "loop" (today's path, everywhere on
    CPU). CUDA graphs default to on exactly when the device is CUDA and the decode attention
    is graph-safe ("sdpa" or "triton").
    """
    cuda = device.type == "cuda"
    attention = config.decode_attention
    if attention == "auto":
        attention = "triton" if cuda and triton_available() else "loop"
    if attention == "triton":
        if not triton_available():
            raise GenerationError("decode_attention='triton' needs the triton package")
        if not cuda and not triton_interpreting():
            raise GenerationError(
                f"decode_attention='triton' needs a CUDA device (the model is on {device}), "
                "or TRITON_INTERPRET=1 to run the kernel in Triton's interpreter"
            )
    graphs = config.cuda_graphs
    if graphs is None:
        graphs = cuda and attention != "loop"
    if graphs and not cuda:
        raise GenerationError(f"cuda_graphs=True needs a CUDA device (the model is on {device})")
    if graphs and attention == "loop":
        raise GenerationError(
            "cuda_graphs=True needs a graph-safe decode attention: decode_attention='sdpa' "
            "or 'triton', not 'loop'"
        )
    return attention, bool(graphs)


def sample_seed(seed: int | None, index: int) -> int | None:
    """Sample i of a seeded request gets its own seed derived from (seed, i); sample 0 uses seed.

    So sample i of an ``n``-sample request is reproduced alone by a one-sample request with
    ``seed=sample_seed(seed, i)`` (TGI's `best_of` reports each sample's seed this way)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _is_token_id(value: object) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _prompt_list(prompts: Prompt | Iterable[Prompt]) -> list[Prompt]:
    """The prompts of one `LLM.generate` call as a list.

    A single prompt is wrapped, not iterated: a string would otherwise become one prompt per
    character, silently. A list of token ids or of chat messages cannot be a list of prompts
    (an int or a dict is no prompt), so it is one prompt too.
    """
    if isinstance(prompts, str):
        return [prompts]
    try:
        items = list(prompts)
    except TypeError:
        raise GenerationError(
            f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}"
        ) from None
    if items and (all(_is_token_id(t) for t in items) or all(isinstance(m, dict) for m in items)):
        return [items]
    return items


class LLM:
    """Blocking offline generation: `LLM(model, tokenizer).generate(prompts, params)`.

    `model` is a loaded model, or, as in vLLM, a checkpoint directory, hub id or LoRA adapter
    directory, loaded with `tulu.pretrained.load_pretrained` (`dtype`, `device`, `revision`)
    together with its tokenizer (unless one is given).
    """

    def __init__(
        self,
        model: GPTNeoXForCausalLM | str | os.PathLike[str],
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        lora_modules: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        enable_lora: bool = False,
    ):
        if isinstance(tokenizer, EngineConfig):  # LLM("path", EngineConfig(...))
            raise GenerationError(
                "LLM: the second argument is the tokenizer; pass the engine settings as "
                "config=EngineConfig(...)"
            )
        if isinstance(model, str | os.PathLike):
            from tulu.pretrained import load_pretrained

            loaded = load_pretrained(model, dtype=dtype, device=device, revision=revision)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        else:
            given = [
                k
                for k, v in (("dtype", dtype), ("device", device), ("revision", revision))
                if v is not None
            ]
            if given:
                raise GenerationError(
                    f"LLM: {', '.join(given)} apply to a checkpoint path or hub id; this model "
                    "is loaded already (move or cast it yourself)"
                )
        self.engine = LLMEngine(model, tokenizer, config, lora_modules, enable_lora=enable_lora)

    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        params: SamplingParams | Iterable[SamplingParams] | None = None,
        *,
        progress: bool | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        lora: str | Iterable[str | None] | None = None,
        request_ids: Iterable[str] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in the prompts' order.

        `prompts` may also be a single prompt (a string, a list of token ids or a list of chat
        messages), as in vLLM: it gives a list of one result. `lora` names the LoRA adapter of
        every prompt, or gives one name (or None: the base) per prompt. A progress bar is shown
        for more than 16 prompts when `progress` is None. `request_ids` (one per prompt, not in
        use) replaces the fresh ids, so that `on_output` can tell which prompt an output is
        for while the others still run (`tulu generate` saves each result as it finishes).
        """
        prompts = _prompt_list(prompts)
        default = SamplingParams() if params is None else params
        param_list = _one_per_prompt(
            default, SamplingParams, len(prompts), "params", "SamplingParams"
        )
        lora_list = _one_per_prompt(lora, str, len(prompts), "lora", "lora names")
        chosen_ids = [None] * len(prompts) if request_ids is None else list(request_ids)
        if len(chosen_ids) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(chosen_ids)} request ids")
        engine = self.engine
        ids = []
        try:
            for prompt, p, name, chosen in zip(
                prompts, param_list, lora_list, chosen_ids, strict=True
            ):
                ids.append(engine.add_request(prompt, p, request_id=chosen, lora=name))
        except BaseException as err:
            # All or nothing: withdraw the prompts already added, whatever refused this one.
            for rid in ids:
                engine.abort(rid)
            if isinstance(err, TuluError):  # GenerationError, ChatFormatError, ...
                raise GenerationError(f"prompt {len(ids)}: {err}") from None
            raise
        results: dict[str, RequestOutput] = {}
        mine = set(ids)
        show = progress if progress is not None else len(prompts) > 16
        bar = _Progress(len(prompts)) if show else None
        try:
            while len(results) < len(ids):
                for output in engine.step():
                    if output.request_id not in mine:
                        continue  # e.g. the abort notice of an earlier, interrupted call
                    if on_output:
                        on_output(output)
                    if output.finished:
                        results[output.request_id] = output
                        if bar:
                            bar.advance(sum(len(c.token_ids) for c in output.outputs))
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [results[rid] for rid in ids]


def _one_per_prompt(value: Any, single: type, count: int, field: str, plural: str) -> list[Any]:
    """`value` repeated for each of `count` prompts when it is one `single` (or None), else
    `value` as a list, which must hold one per prompt."""
    if value is None or isinstance(value, single):
        return [value] * count
    try:
        values = list(value)
    except TypeError:
        raise GenerationError(
            f"{field} must be {'an adapter name' if single is str else single.__name__} or a "
            f"list of them, got {type(value).__name__}"
        ) from None
    if len(values) != count:
        raise GenerationError(f"{count} prompts but {len(values)} {plural}")
    return values


class _Progress:
    """A rich progress bar counting finished requests and output tokens/s."""

    def __init__(self, total: int):
        from tulu.progress import progress_bar

        self.started = time.perf_counter()
        self.tokens = 0
        self.progress = progress_bar("generating", detail="{task.fields[rate]}")
        self.task = self.progress.add_task("generate", total=total, rate="")
        self.progress.start()

    def advance(self, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=1, rate=f"{rate:,.0f} tok/s")

    def close(self) -> None:
        self.progress.stop()
