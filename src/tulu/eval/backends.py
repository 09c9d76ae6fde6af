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

Every backend fits each generation into the model's context window: a prompt's ``max_tokens``
is capped at the window minus the prompt's length, and a prompt that fills the window on its
own gets empty outputs (counted in ``too_long``) without being sent. Servers refuse a request
whose prompt plus ``max_tokens`` exceeds the window (``tulu serve`` and vLLM answer 400), so
the HTTP backends count prompt tokens with the model's tokenizer and learn the window from
the server (``/v1/models``' ``max_model_len``, TGI's ``/info``), or else from
``context_window`` (default 2048).

Scoring (`next_token_logprobs`) needs room for one token after the prompt. A prompt that
leaves none is cut to its last ``window - 1`` tokens (the question and the answer prefix,
which decide the next token) and counted in ``too_long``, by every backend alike: the engine
cuts the token ids, the HTTP backends send the text of those last tokens (servers take text),
so a server's 400 for an over-long prompt does not stop a whole MMLU run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tulu.errors import TuluError

__all__ = ["Backend", "Decoding", "EngineBackend", "OpenAIBackend", "TGIBackend"]

#: The context window assumed when a server does not report one (Pythia's).
DEFAULT_CONTEXT_WINDOW = 2048


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
    """The in-process engine: `LLM.generate` over all prompts of a task at once.

    `progress` is `LLM.generate`'s bar; `tulu eval` passes its `EvalContext.progress_bars`
    (stderr is a terminal), so the generation bar follows the sandbox's.
    """

    def __init__(self, llm: Any, *, progress: bool = True) -> None:
        self.llm = llm
        self.progress = progress
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.context_window = engine.max_model_len  # the model's window, or a cap of it
        #: Prompts that did not fit the context window: generations get empty outputs,
        #: scoring keeps the prompt's last tokens (see the module doc).
        self.too_long = 0

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        """Continuations; a generation stops at the context window (``max_tokens`` is capped
        at the window minus the prompt's length, whereas transformers' ``generate`` with
        ``max_new_tokens`` would run past it), and a prompt that fills the window on its own
        gets empty outputs (counted)."""
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

    ``max_tokens`` is capped per prompt to fit the context window (see the module doc): the
    window is the ``max_model_len`` that ``GET /v1/models`` reports for `model` (``tulu serve``
    and vLLM report it), else `context_window`, else 2048. Prompts are measured with
    `tokenizer`; without one, ``max_tokens`` is sent unchanged. Scoring cuts a prompt that
    leaves no room for one token to its last ``window - 1`` tokens (see the module doc).
    """

    api_base: str
    model: str
    tokenizer: Any = None
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 4
    top_logprobs: int = 20
    #: The window when the server does not report one.
    context_window: int | None = None
    #: Prompts that did not fit the window: generations get empty outputs (not sent), scoring
    #: sends the prompt's last tokens (see the module doc).
    too_long: int = field(default=0, init=False)
    _client: Any = field(default=None, init=False, repr=False)
    _window: int | None = field(default=None, init=False, repr=False)

    def _http(self):
        if self._client is None:
            self._client = _client(self.api_key, self.timeout)
        return self._client

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        return _post_json(
            self._http(), self.api_base.rstrip("/") + "/completions", payload, self.retries
        )

    def window(self) -> int:
        """The server's context window (asked once), else `context_window`, else 2048."""
        if self._window is None:
            models = _get_json(self._http(), self.api_base.rstrip("/") + "/models")
            data = models.get("data") if isinstance(models, dict) else None
            entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
            # this model's entry, else the first (a server that serves one model under aliases)
            mine = [e for e in entries if e.get("id") == self.model] or entries[:1]
            reported = mine[0].get("max_model_len") if mine else None
            self._window = _window(reported, self.context_window)
        return self._window

    def _map(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._post, payloads))

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        base = {
            "model": self.model,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "n": decoding.n,
        }
        if decoding.stop:
            base["stop"] = list(decoding.stop)
        if decoding.seed is not None:
            base["seed"] = decoding.seed
        budgets = self._budgets(prompts, decoding.max_tokens)
        runnable = [i for i, budget in enumerate(budgets) if budget > 0]
        self.too_long += len(prompts) - len(runnable)
        responses = self._map(
            [{**base, "max_tokens": budgets[i], "prompt": prompts[i]} for i in runnable]
        )
        results: list[list[str]] = [[""] * decoding.n for _ in prompts]
        url = self.api_base.rstrip("/") + "/completions"
        for i, response in zip(runnable, responses, strict=True):
            results[i] = _read(url, response, lambda r: _completion_texts(r, decoding.n))
        return results

    def _budgets(self, prompts: Sequence[str], max_tokens: int) -> list[int]:
        if self.tokenizer is None:
            return [max_tokens] * len(prompts)
        return _budgets(self.tokenizer, prompts, max_tokens, self.window())

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
        prompts, cut = _fit_for_scoring(self.tokenizer, prompts, self.window() - 1)
        self.too_long += cut
        responses = self._map([{**base, "prompt": prompt} for prompt in prompts])
        url = self.api_base.rstrip("/") + "/completions"

        def row(response: Any) -> list[float]:
            # No alternatives at all is a server that ignores `logprobs`: every candidate
            # would read -inf and every answer would be "A".
            top = response["choices"][0]["logprobs"]["top_logprobs"][0]
            if not isinstance(top, dict) or not top:
                raise ValueError("no top_logprobs for the first token")
            return [float(top.get(s, -math.inf)) for s in strings]

        return [_read(url, response, row) for response in responses]


def _completion_texts(response: Any, n: int) -> list[str]:
    """The `n` choices' texts of a ``/v1/completions`` answer, in index order.

    A server that ignores ``n`` would otherwise hand back fewer samples than pass@k needs.
    """
    choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
    texts = [choice["text"] for choice in choices]
    if len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected {n} choice(s) with a text")
    return texts


_T = TypeVar("_T")


def _read(url: str, response: Any, read: Callable[[Any], _T]) -> _T:
    """`read(response)`, or a TuluError naming `url` and quoting the answer when it lacks
    what `read` needs (an error object, another API's layout, fewer choices than asked)."""
    try:
        return read(response)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        quoted = json.dumps(response, ensure_ascii=False)[:300]
        raise TuluError(f"{url}: unexpected answer ({err}): {quoted}") from None


def _budgets(
    tokenizer: Any,
    prompts: Sequence[str],
    max_tokens: int,
    window: int,
    max_input: int | None = None,
) -> list[int]:
    """Each prompt's max_tokens: at most what the window leaves after it; 0 when the prompt
    does not fit (it fills the window, or is longer than `max_input`)."""
    lengths = [len(ids) for ids in tokenizer.encode_batch(list(prompts))]
    return [
        0 if max_input is not None and n > max_input else max(0, min(max_tokens, window - n))
        for n in lengths
    ]


def _fit_for_scoring(tokenizer: Any, prompts: Sequence[str], limit: int) -> tuple[list[str], int]:
    """The prompts to score, each at most `limit` tokens, and how many had to be cut.

    A longer prompt keeps its last tokens, as `EngineBackend.next_token_logprobs` does: the
    end of an MMLU prompt (question, choices, "The answer is:") decides the next token.
    """
    fitted: list[str] = []
    cut = 0
    for prompt, ids in zip(prompts, tokenizer.encode_batch(list(prompts)), strict=True):
        if len(ids) > limit:
            cut += 1
            prompt = _tail_text(tokenizer, ids, limit)
        fitted.append(prompt)
    return fitted, cut


def _tail_text(tokenizer: Any, ids: Sequence[int], limit: int) -> str:
    """The text of the last `limit` tokens of `ids`, cut further right if needed so that it
    starts on a whole character and encodes to at most `limit` tokens again.

    The server re-tokenizes what it is sent: a cut through a multi-byte character would send
    U+FFFD, and a different BPE merge at the cut could make the text a token longer than the
    window allows (the server would refuse it).
    """
    for start in range(max(0, len(ids) - limit), len(ids)):
        text = tokenizer.decode(ids[start:])
        if not text.startswith("\ufffd") and len(tokenizer.encode(text)) <= limit:
            return text
    return ""


def _window(reported: Any, fallback: int | None) -> int:
    if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
        return reported
    return fallback or DEFAULT_CONTEXT_WINDOW


def _get_json(client: Any, url: str) -> Any:
    """GET a JSON document once; None on any failure (the caller falls back to a default)."""
    import httpx

    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


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
                try:
                    return response.json()
                except ValueError:
                    raise TuluError(
                        f"{url}: HTTP 200 but the answer is not JSON: {response.text[:300]!r}"
                    ) from None
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
    first generated token (ids, so the candidates need no mapping); a candidate outside them
    reads as ``-inf``.

    ``max_new_tokens`` is capped per prompt to fit the context window (see the module doc):
    the window is ``max_total_tokens`` from ``GET /info``, else `context_window`, else 2048,
    and a prompt longer than ``/info``'s ``max_input_tokens`` is not sent (scoring sends its
    last tokens instead). Prompts are measured with `tokenizer` (the model's own); without
    one, ``max_tokens`` is sent unchanged and scoring prompts are sent whole.
    """

    url: str
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 4
    top_n_tokens: int = 5
    tokenizer: Any = None
    #: The window when the server does not report one.
    context_window: int | None = None
    #: Prompts that did not fit the window: generations get empty outputs (not sent), scoring
    #: sends the prompt's last tokens (see the module doc).
    too_long: int = field(default=0, init=False)
    _client: Any = field(default=None, init=False, repr=False)
    _window: int | None = field(default=None, init=False, repr=False)
    _max_input: int | None = field(default=None, init=False, repr=False)

    def _http(self):
        if self._client is None:
            self._client = _client(self.api_key, self.timeout)
        return self._client

    def _post(self, payload: dict[str, Any]) -> Any:
        return _post_json(self._http(), self.url.rstrip("/") + "/generate", payload, self.retries)

    def window(self) -> int:
        """The server's ``max_total_tokens`` (asked once), else `context_window`, else 2048."""
        if self._window is None:
            info = _get_json(self._http(), self.url.rstrip("/") + "/info")
            info = info if isinstance(info, dict) else {}
            self._window = _window(info.get("max_total_tokens"), self.context_window)
            max_input = info.get("max_input_tokens", info.get("max_input_length"))
            self._max_input = _window(max_input, self._window - 1)
        return self._window

    def max_input_tokens(self) -> int:
        """The longest prompt the server takes (``/info``'s, else the window minus one):
        longer ones are not sent, so it belongs in the cache key like the window."""
        self.window()
        assert self._max_input is not None  # set by window()
        return self._max_input

    def _map(self, payloads: list[dict[str, Any]]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._post, payloads))

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        sample = decoding.temperature > 0
        if self.tokenizer is None:
            budgets = [decoding.max_tokens] * len(prompts)
        else:
            window = self.window()
            budgets = _budgets(
                self.tokenizer, prompts, decoding.max_tokens, window, self._max_input
            )
        runnable = [i for i, budget in enumerate(budgets) if budget > 0]
        self.too_long += len(prompts) - len(runnable)
        payloads = []
        for i in runnable:
            prompt = prompts[i]
            for j in range(decoding.n):
                parameters: dict[str, Any] = {
                    "max_new_tokens": budgets[i],
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
        url = self.url.rstrip("/") + "/generate"
        texts = [
            _read(url, r, lambda r: _strip_stop(_text(r["generated_text"]), decoding.stop))
            for r in self._map(payloads)
        ]
        results: list[list[str]] = [[""] * decoding.n for _ in prompts]
        for k, i in enumerate(runnable):
            results[i] = texts[k * decoding.n : (k + 1) * decoding.n]
        return results

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        parameters = {"max_new_tokens": 1, "details": True, "top_n_tokens": self.top_n_tokens}
        if self.tokenizer is not None:  # without one, prompts are sent as given
            window = self.window()  # also learns max_input_tokens
            limit = min(window - 1, self._max_input or window)
            prompts, cut = _fit_for_scoring(self.tokenizer, prompts, limit)
            self.too_long += cut
        responses = self._map([{"inputs": p, "parameters": parameters} for p in prompts])
        url = self.url.rstrip("/") + "/generate"

        def row(response: Any) -> list[float]:
            # No alternatives at all is a server without top_n_tokens: every candidate would
            # read -inf and every answer would be "A".
            top = response["details"]["top_tokens"][0]
            if not isinstance(top, list) or not top:
                raise ValueError("no top_tokens for the first token")
            found = {entry["id"]: float(entry["logprob"]) for entry in top}
            return [found.get(token, -math.inf) for token in candidates]

        return [_read(url, response, row) for response in responses]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"generated_text is {type(value).__name__}, not a string")
    return value


def _strip_stop(text: str, stop: Sequence[str]) -> str:
    """TGI includes the matched stop sequence in generated_text; the tasks expect it removed."""
    for sequence in stop:
        if sequence and text.endswith(sequence):
            return text[: -len(sequence)]
    return text
