"""Where evaluation prompts are run: this engine in-process, or any OpenAI-compatible server.

Every task needs one of two things from a model:

- `generate`: continuations of raw prompt strings (the tasks chat-wrap prompts themselves, so
  nothing is re-templated here), with the protocol's decoding settings;
- `next_token_logprobs`: the log-probabilities of a few candidate tokens right after each
  prompt (MMLU scores the answer letters this way).

`EngineBackend` batches everything through `LLM.generate` (continuous batching; prompts that
share few-shot exemplars share KV-cache blocks through prefix caching). `OpenAIBackend` sends
``/v1/completions`` requests to a server such as ``tulu serve`` or vLLM, a few at a time;
`TGIBackend` uses text-generation-inference's native ``/generate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from tulu.errors import TuluError

__all__ = ["Backend", "Decoding", "EngineBackend", "OpenAIBackend", "TGIBackend"]


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of one task's generations (fixed by its protocol)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Backend(Protocol):
    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        """`decoding.n` continuations per prompt, in the prompts' order."""
        ...

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        """Log-probability of each candidate token id right after each prompt."""
        ...


class EngineBackend:
    """The in-process engine: `LLM.generate` over all prompts of a task at once."""

    def __init__(self, llm: Any, *, progress: bool = True) -> None:
        self.llm = llm
        self.progress = progress
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.context_window = engine.model.config.max_position_embeddings
        #: Prompts that did not fit the context window (answered with empty outputs).
        self.too_long = 0

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        """Continuations; a generation stops at the context window, as transformers' does,
        and a prompt that fills the window on its own gets empty outputs (counted)."""
        from tulu.engine.sampling import SamplingParams

        lengths = [len(ids) for ids in self.tokenizer.encode_batch(list(prompts))]
        runnable = [i for i, n in enumerate(lengths) if n < self.context_window]
        self.too_long += len(prompts) - len(runnable)
        params = [
            SamplingParams(
                max_tokens=min(decoding.max_tokens, self.context_window - lengths[i]),
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                n=decoding.n,
                stop=list(decoding.stop),
                seed=decoding.seed,
            )
            for i in runnable
        ]
        results: list[list[str]] = [[""] * decoding.n for _ in prompts]
        if not runnable:
            return results
        outputs = self.llm.generate([prompts[i] for i in runnable], params, progress=self.progress)
        for i, out in zip(runnable, outputs, strict=True):
            results[i] = [choice.text for choice in out.outputs]
        return results

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        from tulu.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, candidate_token_ids=list(candidates))
        # A prompt that fills the window keeps its last tokens (the question and answer
        # prefix, which matter for the next token) and is counted.
        inputs: list[Any] = []
        for ids in self.tokenizer.encode_batch(list(prompts)):
            if len(ids) >= self.context_window:
                self.too_long += 1
                ids = ids[len(ids) - self.context_window + 1 :]
            inputs.append(ids)
        outputs = self.llm.generate(inputs, params, progress=self.progress)
        rows = []
        for out in outputs:
            found = out.outputs[0].candidate_logprobs[0]
            rows.append([float(found[token]) for token in candidates])
        return rows


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible ``/v1/completions`` endpoint (``tulu serve``, vLLM, TGI's).

    Candidate log-probabilities come from the top ``logprobs`` alternatives of the first
    generated token (OpenAI's API cannot ask for given tokens): a candidate outside them gets
    ``-inf``, which only matters when none of the candidates is among the top 20. Token ids are
    mapped to the server's token strings with `tokenizer` (the model's own).
    """

    api_base: str
    model: str
    tokenizer: Any = None
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 4
    top_logprobs: int = 20
    _client: Any = field(default=None, init=False, repr=False)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._client is None:
            self._client = _client(self.api_key, self.timeout)
        return _post_json(
            self._client, self.api_base.rstrip("/") + "/completions", payload, self.retries
        )

    def _map(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._post, payloads))

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        base = {
            "model": self.model,
            "max_tokens": decoding.max_tokens,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "n": decoding.n,
        }
        if decoding.stop:
            base["stop"] = list(decoding.stop)
        if decoding.seed is not None:
            base["seed"] = decoding.seed
        responses = self._map([{**base, "prompt": prompt} for prompt in prompts])
        results = []
        for response in responses:
            choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
            results.append([choice["text"] for choice in choices])
        return results

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        if self.tokenizer is None:
            raise TuluError("scoring candidate tokens over HTTP needs the model's tokenizer")
        strings = [self.tokenizer.decode([token]) for token in candidates]
        base = {
            "model": self.model,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_logprobs,
        }
        responses = self._map([{**base, "prompt": prompt} for prompt in prompts])
        rows = []
        for response in responses:
            logprobs = response["choices"][0].get("logprobs") or {}
            top = (logprobs.get("top_logprobs") or [{}])[0] or {}
            rows.append([float(top.get(s, -math.inf)) for s in strings])
        return rows


def _client(api_key: str | None, timeout: float):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(timeout=timeout, headers=headers)


def _post_json(client: Any, url: str, payload: dict[str, Any], retries: int) -> Any:
    """POST with retries (exponential backoff) on connection errors, 429 and 5xx."""
    import httpx

    delay = 1.0
    for attempt in range(retries + 1):
        try:
            response = client.post(url, json=payload)
        except httpx.HTTPError as err:
            if attempt == retries:
                raise TuluError(f"{url}: request failed ({err})") from None
        else:
            if response.status_code == 200:
                return response.json()
            if response.status_code not in (429, 500, 502, 503, 504) or attempt == retries:
                raise TuluError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


@dataclass
class TGIBackend:
    """text-generation-inference's native ``POST /generate`` (also served by ``tulu serve``).

    TGI returns one sequence per request, so ``n`` samples are ``n`` requests with seeds
    ``seed, seed + 1, ...``. Candidate log-probabilities come from ``top_n_tokens`` of the
    first generated token (ids, so no tokenizer is needed); a candidate outside them reads as
    ``-inf``.
    """

    url: str
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 4
    top_n_tokens: int = 5
    _client: Any = field(default=None, init=False, repr=False)

    def _post(self, payload: dict[str, Any]) -> Any:
        if self._client is None:
            self._client = _client(self.api_key, self.timeout)
        return _post_json(self._client, self.url.rstrip("/") + "/generate", payload, self.retries)

    def _map(self, payloads: list[dict[str, Any]]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._post, payloads))

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        sample = decoding.temperature > 0
        payloads = []
        for prompt in prompts:
            for j in range(decoding.n):
                parameters: dict[str, Any] = {
                    "max_new_tokens": decoding.max_tokens,
                    "do_sample": sample,
                }
                if sample:
                    parameters["temperature"] = decoding.temperature
                    if decoding.top_p < 1:
                        parameters["top_p"] = decoding.top_p
                    if decoding.seed is not None:
                        parameters["seed"] = decoding.seed + j
                if decoding.stop:
                    parameters["stop"] = list(decoding.stop)
                payloads.append({"inputs": prompt, "parameters": parameters})
        texts = [_strip_stop(r["generated_text"], decoding.stop) for r in self._map(payloads)]
        return [texts[i * decoding.n : (i + 1) * decoding.n] for i in range(len(prompts))]

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        parameters = {"max_new_tokens": 1, "details": True, "top_n_tokens": self.top_n_tokens}
        responses = self._map([{"inputs": p, "parameters": parameters} for p in prompts])
        rows = []
        for response in responses:
            top = ((response.get("details") or {}).get("top_tokens") or [[]])[0]
            found = {entry["id"]: float(entry["logprob"]) for entry in top}
            rows.append([found.get(token, -math.inf) for token in candidates])
        return rows


def _strip_stop(text: str, stop: Sequence[str]) -> str:
    """TGI includes the matched stop sequence in generated_text; the tasks expect it removed."""
    for sequence in stop:
        if sequence and text.endswith(sequence):
            return text[: -len(sequence)]
    return text
