"""AlpacaFarm: the model's win rate over text-davinci-003, decided by an LLM judge.

The protocol:

1. The 805 AlpacaFarm evaluation instructions, each with davinci-003's reference answer
   (`load_alpaca_farm`). The original AlpacaFarm file keeps ``instruction`` and ``input``
   apart; the AlpacaEval reference-outputs file has them merged. Both are read: the first for
   the fields, the second for the reference answer, and they are checked to be the same 805
   instructions in the same order, so a mismatched pair of files cannot go unnoticed.
2. The model sees ``instruction.strip() + "\\n\\n" + input.strip()`` (just the instruction,
   unstripped, when there is no input: open-instruct's 2023 ``eval/alpaca_farm_eval.py``
   strips the two parts only when joining them) as one Tulu user turn:
   ``chat_wrap(prompt, "")``, i.e. ``"<|user|>\\n" + prompt + "\\n<|assistant|>\\n"``. That
   is the same text as ``tulu.chat.generation_prompt([user prompt], eos)`` (no EOS appears
   before the assistant header), without needing the tokenizer's EOS.
3. Greedy decoding, at most 2,048 new tokens, no stop string (`GENERATION`).
4. A judge model behind any OpenAI-compatible ``/chat/completions`` endpoint compares the
   model's output with the reference (`Judge`), at temperature 0. A seeded coin per example
   decides whether the model's output is shown first or second, so the judge's position bias
   averages out instead of favouring one side; the position is recorded in each `Judgement`.
   An output identical to the reference is a tie without asking (AlpacaFarm's rule).
5. How comparisons become requests and answers become verdicts is the judge prompt's job:

   - `PairTemplate` (the default): the project's own prompt (``templates/alpaca_judge.txt``),
     or any ``--judge-template FILE`` holding ``{instruction}``, ``{output_1}`` and
     ``{output_2}``; one comparison per request as one user message. The answer is parsed
     leniently (``"Output (1)"``, ``"(2)"``, ``"1"``, ...); an explicit tie, or an answer that
     names neither or both outputs, counts as half a win, the latter also counted as
     ``unparsable`` so a badly behaved judge shows up in the report.
   - `tulu.eval.alpaca_annotator.Annotator` (``--judge-annotator``): an AlpacaFarm annotator
     config, such as the ``greedy_gpt4`` one behind the paper's figure: batches of 5 in ChatML
     prompts, verdicts matched by its regular expressions, and batches whose answer cannot be
     parsed left out of the win rate, as AlpacaFarm did.

6. The win rate (`score`) is ``(wins + ties / 2) / n``, a fraction in ``[0, 1]``, over the
   examples that got a verdict.

Numbers from the default prompt are comparable across our runs, not to the paper's leaderboard;
the paper's annotator with the paper's judge model (GPT-4-0314) is what the card's 9.2 used.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx

from tulu.errors import DataError, TuluError
from tulu.eval.alpaca_annotator import Annotator, Comparison, JudgeRequest
from tulu.eval.backends import Decoding
from tulu.eval.chat_wrap import chat_wrap
from tulu.eval.files import read_json

__all__ = [
    "DEFAULT_SEED",
    "GENERATION",
    "MAX_NEW_TOKENS",
    "N_EXAMPLES",
    "PLACEHOLDERS",
    "REFERENCE_FILE",
    "SPLIT_FILE",
    "AlpacaFarmExample",
    "AlpacaFarmResult",
    "Judge",
    "JudgePrompt",
    "Judgement",
    "PairTemplate",
    "build_judge_prompt",
    "build_prompt",
    "check_judge_url",
    "load_alpaca_farm",
    "load_judge_template",
    "merge_instruction",
    "model_positions",
    "parse_choice",
    "score",
]

N_EXAMPLES = 805
MAX_NEW_TOKENS = 2048
DEFAULT_SEED = 42
REFERENCE_FILE = "text_davinci_003_model_outputs.json"
SPLIT_FILE = "alpacafarm_eval_gpt-3.5-turbo-0301.json"
PLACEHOLDERS = ("{instruction}", "{output_1}", "{output_2}")


#: Decoding fixed by the protocol (greedy), not tunable per model.
GENERATION = Decoding(max_tokens=MAX_NEW_TOKENS)


# ----------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class AlpacaFarmExample:
    """One evaluation instruction, its optional input, and davinci-003's reference answer."""

    instruction: str
    input: str
    reference: str
    dataset: str = ""
    index: int = 0

    @property
    def full_instruction(self) -> str:
        """What the model and the judge are asked: instruction and input, blank-line joined."""
        return merge_instruction(self.instruction, self.input)

    @property
    def prompt(self) -> str:
        """The chat-wrapped generation prompt for this example."""
        return build_prompt(self.instruction, self.input)


def merge_instruction(instruction: str, input_text: str) -> str:
    """``instruction + "\\n\\n" + input`` when there is an input, else the instruction."""
    return instruction + "\n\n" + input_text if input_text else instruction


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The model's prompt: the merged instruction as one Tulu user turn, assistant open.

    With an input, both parts are stripped before joining, as open-instruct's generation
    script did; the judge still sees the fields as given (`merge_instruction`).
    """
    if input_text:
        return chat_wrap(instruction.strip() + "\n\n" + input_text.strip(), "")
    return chat_wrap(instruction, "")


def _read_records(path: Path) -> list[dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects")
    return data


def _field(record: dict[str, Any], name: str, path: Path, index: int) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"{path}: record {index}: expected a string field {name!r}")
    return value


def load_alpaca_farm(data_dir: str | Path) -> list[AlpacaFarmExample]:
    """The 805 examples, from `SPLIT_FILE` (instruction, input) and `REFERENCE_FILE` (answers).

    Raises DataError naming every missing file, and when the two files disagree on the
    instructions (count or text, after merging instruction and input).
    """
    data_dir = Path(data_dir)
    split_path, reference_path = data_dir / SPLIT_FILE, data_dir / REFERENCE_FILE
    missing = [str(p) for p in (split_path, reference_path) if not p.is_file()]
    if missing:
        raise DataError(
            "AlpacaFarm data incomplete, missing: " + ", ".join(missing) + " (the AlpacaFarm "
            "evaluation split with separate instruction/input, and the AlpacaEval "
            "text-davinci-003 reference outputs)"
        )
    split, references = _read_records(split_path), _read_records(reference_path)
    if len(split) != len(references):
        raise DataError(
            f"{split_path} has {len(split)} records but {reference_path} has {len(references)}"
        )
    examples = []
    for index, (record, ref) in enumerate(zip(split, references, strict=True)):
        instruction = _field(record, "instruction", split_path, index)
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise DataError(f"{split_path}: record {index}: 'input' must be a string")
        merged = merge_instruction(instruction, input_text)
        if _field(ref, "instruction", reference_path, index) != merged:
            raise DataError(
                f"record {index}: instruction in {reference_path} differs from {split_path} "
                f"({merged[:60]!r}...); the files are not the same evaluation set"
            )
        examples.append(
            AlpacaFarmExample(
                instruction=instruction,
                input=input_text,
                reference=_field(ref, "output", reference_path, index),
                dataset=str(ref.get("dataset") or record.get("dataset") or ""),
                index=index,
            )
        )
    if not examples:
        raise DataError(f"{split_path}: no examples")
    return examples


# ----------------------------------------------------------------------------------- judge prompt


def load_judge_template(path: str | Path | None = None) -> str:
    """The judge template: `path`, or the packaged ``templates/alpaca_judge.txt``.

    Checked up front for the three placeholders, so a wrong file fails before any request
    is sent rather than producing 805 meaningless judgements.
    """
    if path is None:
        resource = resources.files("tulu.eval").joinpath("templates", "alpaca_judge.txt")
        where, text = "packaged alpaca_judge.txt", resource.read_text(encoding="utf-8")
    else:
        where = str(path)
        if not Path(path).is_file():
            raise DataError(f"{path}: judge template file not found")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read judge template: {exc}") from exc
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise DataError(
            f"{where}: judge template lacks placeholder(s) {', '.join(missing)} "
            f"(it needs all of {', '.join(PLACEHOLDERS)})"
        )
    return text


_PLACEHOLDER = re.compile(r"\{(instruction|output_1|output_2)\}")


def build_judge_prompt(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """Fill the template in one pass.

    One regex pass (not ``str.format`` nor chained ``replace``) so that braces in a template
    are left alone and text inside an instruction or output that happens to read
    ``{output_2}`` is never substituted itself.
    """
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class PairTemplate:
    """A judge prompt for one comparison per request, sent as a single user message."""

    text: str
    source: str = "packaged alpaca_judge.txt"
    name = "pair template"
    batch_size = 1
    default_model = "gpt-4"
    max_tokens = 64
    temperature = 0.0
    # An answer naming neither output (or both) is scored as a tie: guessing would bias the
    # win rate, and dropping would hide a badly behaved judge behind a smaller n.
    unparsable = "tie"

    @classmethod
    def load(cls, path: str | Path | None = None) -> PairTemplate:
        """`path`, or the packaged template (see `load_judge_template`)."""
        text = load_judge_template(path)
        return cls(text) if path is None else cls(text, str(path))

    def requests(self, comparisons: Sequence[Comparison], seed: int) -> list[JudgeRequest]:
        del seed  # one request per comparison, in order: nothing to randomise
        return [
            JudgeRequest(
                [
                    {
                        "role": "user",
                        "content": build_judge_prompt(
                            self.text,
                            merge_instruction(c.instruction, c.input),
                            c.output_1,
                            c.output_2,
                        ),
                    }
                ],
                (i,),
            )
            for i, c in enumerate(comparisons)
        ]

    def parse(self, answer: str, count: int) -> list[Choice]:
        del count  # always 1
        return [parse_choice(answer)]


#: How comparisons become judge requests and answers become verdicts.
JudgePrompt = PairTemplate | Annotator


# ----------------------------------------------------------------------------------- parsing

_BARE = re.compile(
    r"(?:the\s+)?(?:better\s+)?(?:(?:output|response|answer)\s*)?[(\[#]?\s*([12])\s*[)\]]?"
    r"(?:\s+is\s+better)?[.!]?",
    re.IGNORECASE,
)
_MENTION = re.compile(r"(?:output|response|answer)\s*[(\[#]?\s*([12])\b\s*[)\]]?", re.IGNORECASE)
_TIE = re.compile(r"(?:it'?s\s+an?\s+)?(?:tie|draw|equal|both(?:\s+are)?\s+equal)[.!]?", re.I)

Choice = Literal[1, 2, "tie"] | None


def parse_choice(answer: str) -> Choice:
    """Which output the judge chose: 1, 2, ``"tie"`` when it says so, None when unclear.

    Accepted: the whole answer (or its first line) being ``"Output (1)"``, ``"(2)"``, ``"1"``,
    ``"Response 2"``, ``"Output (1) is better."`` and the like; otherwise an answer that
    mentions exactly one of ``"Output (1)"`` / ``"Output (2)"``. An answer that mentions both
    (or neither) is None: guessing would bias the win rate.
    """
    text = answer.strip().strip("*`\"'").strip()
    lines = [line.strip().strip("*`\"'").strip() for line in text.splitlines() if line.strip()]
    for candidate in [text, *lines[:1]]:
        match = _BARE.fullmatch(candidate)
        if match:
            return 1 if match.group(1) == "1" else 2
        if _TIE.fullmatch(candidate):
            return "tie"
    mentioned = {m.group(1) for m in _MENTION.finditer(text)}
    if len(mentioned) == 1:
        return 1 if mentioned == {"1"} else 2
    return None


# ----------------------------------------------------------------------------------- judging

Winner = Literal["model", "reference", "tie"]


@dataclass(frozen=True)
class Judgement:
    """One judged comparison, with what the judge saw and said, for auditing the result."""

    index: int
    model_position: Literal[1, 2]  # where the model's output was shown; the reference got the other
    raw: str  # the judge's answer, verbatim (for a batched prompt, the whole batch's answer)
    choice: Choice  # parsed: 1, 2, "tie", or None (unparsable)
    asked: bool = True  # False: the output equals the reference, a tie without asking

    @property
    def winner(self) -> Winner:
        """Who won, with the judge's positional choice mapped back to model / reference."""
        if self.choice in (1, 2):
            return "model" if self.choice == self.model_position else "reference"
        return "tie"

    @property
    def unparsable(self) -> bool:
        """The judge's answer gave no verdict for this comparison."""
        return self.choice is None


def model_positions(n: int, seed: int = DEFAULT_SEED) -> list[Literal[1, 2]]:
    """Where the model's output is shown for each of `n` examples: a seeded coin each.

    Drawn in example order from ``random.Random(seed)``, so the assignment does not depend on
    the order in which concurrent requests finish, and the same seed always shows the same
    examples swapped.
    """
    rng = random.Random(seed)
    return [2 if rng.random() < 0.5 else 1 for _ in range(n)]


_RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def check_judge_url(url: str) -> None:
    """Refuse a judge URL that httpx cannot send to (``localhost:8000/v1`` lacks its scheme):
    checked before anything is generated, not after 805 generations."""
    if not url.lower().startswith(("http://", "https://")):
        raise DataError(
            f"judge URL {url!r} must start with http:// or https:// (e.g. http://host:8000/v1)"
        )


Messages = list[dict[str, str]]


class Judge:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint.

    `url` is either the API base (``http://host:8000/v1``, as given to the ``openai`` client)
    or the full ``.../chat/completions`` address. `prompt` decides how comparisons become
    requests (default: the packaged `PairTemplate`); `model` defaults to the prompt's own
    (``gpt-4``, or an annotator config's ``model_name``).

    Requests run in `concurrency` threads over one `httpx.Client`; 408/409/429/5xx answers and
    timeouts are retried `max_retries` times with exponential backoff (honouring a numeric
    ``Retry-After``), since rate limits are the normal state of a hosted judge; a refused
    connection or any other error status fails at once with a TuluError naming the URL, since
    retrying cannot fix it.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        prompt: JudgePrompt | None = None,
        api_key: str | None = None,
        seed: int = DEFAULT_SEED,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        check_judge_url(url)
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.prompt = prompt if prompt is not None else PairTemplate.load()
        self.model = model or self.prompt.default_model
        self.api_key = api_key
        self.seed = seed
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff

    def settings(self) -> dict[str, Any]:
        """What an answer depends on besides the messages: the key of a cached answer."""
        return {
            "url": self.url,
            "model": self.model,
            "max_tokens": self.prompt.max_tokens,
            "temperature": self.prompt.temperature,
        }

    # -- one request

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after", "")
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        return self.backoff * 2**attempt

    def complete(self, client: httpx.Client, messages: Messages) -> str:
        """Send one request (the prompt's temperature and max_tokens); return the reply text."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.prompt.temperature,
            "max_tokens": self.prompt.max_tokens,
        }
        for attempt in range(self.max_retries + 1):
            response: httpx.Response | None = None
            try:
                response = client.post(self.url, json=payload, headers=self._headers())
            except httpx.ConnectError as exc:
                raise TuluError(f"judge at {self.url}: cannot connect ({exc})") from exc
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt == self.max_retries:
                    raise TuluError(
                        f"judge at {self.url}: {type(exc).__name__} after "
                        f"{self.max_retries + 1} attempts ({exc})"
                    ) from exc
            except httpx.HTTPError as exc:  # a proxy's refusal, a malformed request, ...
                raise TuluError(f"judge at {self.url}: {type(exc).__name__} ({exc})") from exc
            else:
                if response.status_code == 200:
                    return self._content(response)
                if response.status_code not in _RETRY_STATUS or attempt == self.max_retries:
                    raise TuluError(
                        f"judge at {self.url}: HTTP {response.status_code} after "
                        f"{attempt + 1} attempt(s): {response.text[:300]}"
                    )
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")  # pragma: no cover

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TuluError(
                f"judge at {self.url}: not a chat-completions response: {response.text[:300]}"
            ) from exc
        return content if isinstance(content, str) else ""

    def ask(self, requests: Sequence[Messages]) -> list[str]:
        """The judge's answers to `requests`, in order, `concurrency` at a time."""
        with httpx.Client(timeout=self.timeout) as client:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures = [pool.submit(self.complete, client, m) for m in requests]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise

    # -- all examples

    def judge(
        self,
        examples: Sequence[AlpacaFarmExample],
        outputs: Sequence[str],
        ask: Callable[[Sequence[Messages]], list[str]] | None = None,
    ) -> list[Judgement]:
        """Judge each model output against its example's reference, in example order.

        `ask` sends the requests (default `ask`); the evaluation runner passes one that keeps
        answers in its cache, so an interrupted run does not pay for a judgement twice.
        """
        if len(outputs) != len(examples):
            raise DataError(f"{len(outputs)} outputs for {len(examples)} AlpacaFarm examples")
        positions = model_positions(len(examples), self.seed)
        judgements: list[Judgement | None] = [None] * len(examples)
        to_ask: list[int] = []
        for i, (example, output) in enumerate(zip(examples, outputs, strict=True)):
            if output == example.reference:
                judgements[i] = Judgement(example.index, positions[i], "", "tie", asked=False)
            else:
                to_ask.append(i)

        comparisons = []
        for i in to_ask:
            example, output = examples[i], outputs[i]
            pair = (output, example.reference) if positions[i] == 1 else (example.reference, output)
            comparisons.append(Comparison(example.instruction, example.input, *pair))
        requests = self.prompt.requests(comparisons, self.seed)
        answers = (ask or self.ask)([r.messages for r in requests])
        for request, answer in zip(requests, answers, strict=True):
            choices = self.prompt.parse(answer, len(request.indices))
            for j, choice in zip(request.indices, choices, strict=True):
                i = to_ask[j]
                judgements[i] = Judgement(examples[i].index, positions[i], answer, choice)
        missing = [examples[i].index for i, j in enumerate(judgements) if j is None]
        if missing:  # a JudgePrompt that skipped comparisons: a bug, never a silent loss
            raise AssertionError(f"no judge request covered examples {missing[:10]}")
        return [j for j in judgements if j is not None]


# ----------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class AlpacaFarmResult:
    """The model's win rate over davinci-003 (ties as half) and the counts behind it.

    ``unparsable`` counts the comparisons the judge gave no verdict for. Under a prompt whose
    policy is ``"tie"`` they are among the ``ties``; under ``"drop"`` they are left out of the
    win rate altogether (``dropped``). ``identical`` counts outputs equal to the reference
    (ties, not sent to the judge).
    """

    win_rate: float
    wins: int
    losses: int
    ties: int
    unparsable: int
    dropped: int = 0
    identical: int = 0
    per_example: list[Judgement] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of examples behind the win rate."""
        return self.wins + self.losses + self.ties


def score(judgements: Sequence[Judgement], unparsable: str = "tie") -> AlpacaFarmResult:
    """Win rate ``(wins + ties / 2) / n`` of the model over the reference.

    `unparsable` is the judge prompt's policy for comparisons without a verdict: ``"tie"``
    (half a win each) or ``"drop"`` (left out of n, as AlpacaFarm did).
    """
    if unparsable not in ("tie", "drop"):
        raise ValueError(f"unparsable must be 'tie' or 'drop', got {unparsable!r}")
    kept = [j for j in judgements if not (unparsable == "drop" and j.unparsable)]
    winners = [j.winner for j in kept]
    wins, losses = winners.count("model"), winners.count("reference")
    ties = winners.count("tie")
    n = len(kept)
    return AlpacaFarmResult(
        win_rate=(wins + ties / 2) / n if n else 0.0,
        wins=wins,
        losses=losses,
        ties=ties,
        unparsable=sum(j.unparsable for j in judgements),
        dropped=len(judgements) - n,
        identical=sum(not j.asked for j in judgements),
        per_example=list(judgements),
    )
