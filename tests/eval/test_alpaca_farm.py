"""AlpacaFarm: loading and prompts, the judge template, answer parsing, and judging end to end
against a deterministic judge server run in-process on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tulu.errors import DataError, TuluError
from tulu.eval import alpaca_farm as af

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DATA_DIR = SHARED / "data" / "eval" / "alpaca_farm"


# ----------------------------------------------------------------------------------- judge server


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


class FakeJudge(ThreadingHTTPServer):
    """A `/v1/chat/completions` server that judges deterministically from the prompt.

    It reads the two outputs between the ``[OUTPUT (n)]`` markers of the packaged template
    and answers: the text after ``SAY:`` when an output contains it (to test parsing);
    else the output containing ``GOOD`` when exactly one does; else the longer one.
    `fail_next` holds status codes to answer with before behaving normally. Tests of other
    prompts set `answer`, a function of the request's messages, instead.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.fail_next: list[int] = []
        self.requests: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self.answer: Callable[[list[dict[str, str]]], str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def decide(self, prompt: str) -> str:
        out1 = _between(prompt, "[OUTPUT (1)]\n", "\n[END OUTPUT (1)]")
        out2 = _between(prompt, "[OUTPUT (2)]\n", "\n[END OUTPUT (2)]")
        for out in (out1, out2):
            if "SAY:" in out:
                return out.split("SAY:", 1)[1]
        if ("GOOD" in out1) != ("GOOD" in out2):
            return "Output (1)" if "GOOD" in out1 else "Output (2)"
        return "Output (1)" if len(out1) >= len(out2) else "Output (2)"


class _Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
            self.server.headers_seen.append(dict(self.headers))
            status = self.server.fail_next.pop(0) if self.server.fail_next else 200
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": f"no route {self.path}"})
        elif status != 200:
            self._send(status, {"error": "try again"})
        else:
            if self.server.answer is not None:
                answer = self.server.answer(body["messages"])
            else:
                answer = self.server.decide(body["messages"][0]["content"])
            message = {"role": "assistant", "content": answer}
            self._send(200, {"choices": [{"index": 0, "message": message}]})


@pytest.fixture
def server() -> Iterator[FakeJudge]:
    srv = FakeJudge()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _examples(n: int) -> list[af.AlpacaFarmExample]:
    return [
        af.AlpacaFarmExample(f"Task {i}", "", f"reference answer {i}", "test", i) for i in range(n)
    ]


# ----------------------------------------------------------------------------------- end to end


def test_win_rate_end_to_end(server: FakeJudge) -> None:
    examples = _examples(40)
    # 30 outputs carry the marker and beat the reference, 10 are short and lose to it
    outputs = [f"GOOD answer {i}" for i in range(30)] + ["no"] * 10
    judge = af.Judge(server.base_url, "judge-model", api_key="sk-test", concurrency=4)
    judgements = judge.judge(examples, outputs)
    result = af.score(judgements)
    assert (result.wins, result.losses, result.ties, result.unparsable) == (30, 10, 0, 0)
    assert result.win_rate == 0.75
    assert result.total == 40
    assert [j.index for j in result.per_example] == list(range(40))
    request = server.requests[0]
    assert request["model"] == "judge-model"
    assert request["temperature"] == 0
    assert len(server.requests) == 40
    assert server.headers_seen[0]["Authorization"] == "Bearer sk-test"


def test_order_randomised_and_mapped_back(server: FakeJudge) -> None:
    n = 200
    positions = af.model_positions(n, seed=42)
    assert positions == af.model_positions(n, seed=42)
    assert positions != af.model_positions(n, seed=7)
    assert 70 <= positions.count(2) <= 130  # about half swapped
    examples = _examples(n)
    outputs = [f"GOOD {i}" for i in range(n)]
    judgements = af.Judge(server.base_url + "/chat/completions", "m", seed=42).judge(
        examples, outputs
    )
    assert [j.model_position for j in judgements] == positions
    # the judge's positional choice follows the model's output, and always maps back to a win
    assert all(j.choice == j.model_position and j.winner == "model" for j in judgements)
    # the server really saw the model's output in the recorded position
    shown = {}
    for request in server.requests:
        prompt = request["messages"][0]["content"]
        index = int(_between(prompt, "[INSTRUCTION]\nTask ", "\n"))
        shown[index] = 1 if "GOOD" in _between(prompt, "[OUTPUT (1)]", "[END OUTPUT (1)]") else 2
    assert [shown[i] for i in range(n)] == positions
    assert af.score(judgements).win_rate == 1.0


def test_ties_and_unparsable(server: FakeJudge) -> None:
    examples = _examples(6)
    outputs = [
        "GOOD one",  # win
        "x",  # loss (shorter than the reference, no marker)
        "SAY:Tie",  # explicit tie
        "SAY:I cannot decide between them.",  # unparsable
        "SAY:Output (1) and Output (2) are both fine.",  # names both: unparsable
        "SAY:",  # empty answer: unparsable
    ]
    result = af.score(af.Judge(server.base_url, "m").judge(examples, outputs))
    assert (result.wins, result.losses, result.ties, result.unparsable) == (1, 1, 4, 3)
    assert result.win_rate == pytest.approx((1 + 4 / 2) / 6)
    assert [j.winner for j in result.per_example] == ["model", "reference"] + ["tie"] * 4


def test_retry_on_503_then_success(server: FakeJudge) -> None:
    server.fail_next = [503, 429]
    judge = af.Judge(server.base_url, "m", backoff=0.01, concurrency=1)
    judgements = judge.judge(_examples(1), ["GOOD"])
    assert judgements[0].winner == "model"
    assert len(server.requests) == 3


def test_retries_exhausted_and_other_errors(server: FakeJudge) -> None:
    server.fail_next = [503] * 3
    judge = af.Judge(server.base_url, "m", backoff=0.01, max_retries=2, concurrency=1)
    with pytest.raises(TuluError, match=r"HTTP 503 after 3 attempt"):
        judge.judge(_examples(1), ["GOOD"])
    server.fail_next = [401]
    with pytest.raises(TuluError, match=r"HTTP 401 after 1 attempt"):
        judge.judge(_examples(1), ["GOOD"])
    assert len(server.requests) == 4  # a 401 is not retried
    with pytest.raises(TuluError, match="/nope/chat/completions: HTTP 404"):
        af.Judge(server.base_url.replace("/v1", "/nope"), "m").judge(_examples(1), ["a"])


def test_connection_refused_names_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again at once: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TuluError, match=f"judge at {url}/chat/completions: cannot connect"):
        af.Judge(url, "m", concurrency=2).judge(_examples(3), ["a", "b", "c"])


def test_a_url_httpx_cannot_send_to_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="must start with http:// or https://"):
        af.Judge("localhost:8000/v1", "m")


def test_other_transport_errors_name_the_url() -> None:
    """An httpx error outside the retried ones (here a proxy's refusal) is a TuluError naming
    the judge, not a traceback."""
    import httpx

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ProxyError("407 Proxy Authentication Required", request=request)

    judge = af.Judge("http://judge.invalid/v1", "m", max_retries=0)
    with httpx.Client(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(
            TuluError,
            match=r"judge at http://judge\.invalid/v1/chat/completions: "
            r"ProxyError \(407",
        ):
            judge.complete(client, [{"role": "user", "content": "hi"}])


def test_output_equal_to_reference_is_a_tie_without_asking(server: FakeJudge) -> None:
    examples = _examples(3)
    judgements = af.Judge(server.base_url, "m").judge(
        examples, ["GOOD", examples[1].reference, "x"]
    )
    assert [j.winner for j in judgements] == ["model", "tie", "reference"]
    assert [j.asked for j in judgements] == [True, False, True]
    assert len(server.requests) == 2
    result = af.score(judgements)
    assert (result.identical, result.ties, result.unparsable) == (1, 1, 0)


def test_default_model_and_settings(server: FakeJudge) -> None:
    judge = af.Judge(server.base_url)
    assert judge.model == "gpt-4"
    assert judge.settings() == {
        "url": server.base_url + "/chat/completions",
        "model": "gpt-4",
        "max_tokens": 64,
        "temperature": 0.0,
    }
    judge.judge(_examples(1), ["GOOD"])
    assert server.requests[0]["max_tokens"] == 64


def test_outputs_must_match_examples(server: FakeJudge) -> None:
    with pytest.raises(DataError, match="2 outputs for 3"):
        af.Judge(server.base_url, "m").judge(_examples(3), ["a", "b"])


# ----------------------------------------------------------------------------------- template


def test_packaged_template() -> None:
    template = af.load_judge_template()
    for placeholder in af.PLACEHOLDERS:
        assert template.count(placeholder) == 1
    assert "Output (1)" in template and "Output (2)" in template


def test_template_placeholder_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("Compare {output_1} with {output_2}.")
    with pytest.raises(DataError, match=r"lacks placeholder\(s\) \{instruction\}"):
        af.load_judge_template(bad)
    with pytest.raises(DataError, match="lacks placeholder"):
        af.PairTemplate.load(bad)
    with pytest.raises(DataError, match="judge template file not found"):
        af.load_judge_template(tmp_path / "absent.txt")


def test_custom_template_is_used(server: FakeJudge, tmp_path: Path) -> None:
    custom = tmp_path / "mine.txt"
    custom.write_text(
        'JSON-ish {"keep": "braces"}\n[INSTRUCTION]\n{instruction}\n[END INSTRUCTION]\n'
        "[OUTPUT (1)]\n{output_1}\n[END OUTPUT (1)]\n[OUTPUT (2)]\n{output_2}\n[END OUTPUT (2)]"
    )
    prompt = af.PairTemplate.load(custom)
    assert prompt.source == str(custom)
    judgements = af.Judge(server.base_url, "m", prompt=prompt).judge(_examples(2), ["GOOD", "x"])
    assert [j.winner for j in judgements] == ["model", "reference"]
    assert server.requests[0]["messages"][0]["content"].startswith('JSON-ish {"keep": "braces"}')


def test_build_judge_prompt_single_pass() -> None:
    prompt = af.build_judge_prompt(
        "I={instruction} A={output_1} B={output_2} {x}", "i", "{output_2}", "b"
    )
    assert prompt == "I=i A={output_2} B=b {x}"


# ----------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Output (1)", 1),
        ("Output (2)", 2),
        ("  output (2)\n", 2),
        ("1", 1),
        ("2.", 2),
        ("(1)", 1),
        ("**Output (2)**", 2),
        ("Output 1", 1),
        ("Response 2", 2),
        ("Output (1) is better.", 1),
        ("Output (2)\nBecause it is more accurate than output 1.", 2),
        ("After comparing, I prefer Output (2) because it is accurate.", 2),
        ("Tie", "tie"),
        ("Both are equal.", "tie"),
        ("Output (1) and Output (2) are equally good.", None),
        ("I cannot tell.", None),
        ("", None),
        ("3", None),
        ("Output (a)", None),
    ],
)
def test_parse_choice(answer: str, expected: object) -> None:
    assert af.parse_choice(answer) == expected


def test_score_empty_and_mapping() -> None:
    assert af.score([]).win_rate == 0.0
    judgements = [
        af.Judgement(0, 1, "Output (1)", 1),  # model shown first, chosen: win
        af.Judgement(1, 2, "Output (1)", 1),  # model shown second, first chosen: loss
        af.Judgement(2, 2, "Output (2)", 2),  # win
        af.Judgement(3, 1, "??", None),  # unparsable: tie
    ]
    result = af.score(judgements)
    assert (result.wins, result.losses, result.ties, result.unparsable) == (2, 1, 1, 1)
    assert result.win_rate == pytest.approx(2.5 / 4)
    dropped = af.score(judgements, unparsable="drop")  # AlpacaFarm's rule for its annotators
    assert (dropped.wins, dropped.losses, dropped.ties, dropped.dropped) == (2, 1, 0, 1)
    assert dropped.unparsable == 1 and dropped.total == 3
    assert dropped.win_rate == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unparsable"):
        af.score(judgements, unparsable="skip")


# ----------------------------------------------------------------------------------- data


def test_generation_settings() -> None:
    assert af.MAX_NEW_TOKENS == 2048
    assert af.GENERATION.max_tokens == 2048
    assert af.GENERATION.temperature == 0.0


def test_prompt_format() -> None:
    assert af.build_prompt("Say hi.") == "<|user|>\nSay hi.\n<|assistant|>\n"
    assert af.build_prompt("Fix this.", "teh cat") == (
        "<|user|>\nFix this.\n\nteh cat\n<|assistant|>\n"
    )


def test_prompt_strips_instruction_and_input_only_when_joined() -> None:
    # open-instruct's 2023 eval/alpaca_farm_eval.py (commit e44fcf58, convert_to_msg_format):
    # instruction.strip() + "\n\n" + input.strip() with an input, the raw instruction without.
    assert af.build_prompt(" Fix this. \n", "\n teh cat ") == (
        "<|user|>\nFix this.\n\nteh cat\n<|assistant|>\n"
    )
    assert af.build_prompt("Say hi. \n") == "<|user|>\nSay hi. \n\n<|assistant|>\n"
    assert af.build_prompt("Say hi. ", "  ") == "<|user|>\nSay hi.\n\n\n<|assistant|>\n"
    # the judge sees the fields as given
    assert af.merge_instruction(" Fix this. ", "teh cat") == " Fix this. \n\nteh cat"


def test_missing_files_listed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{af.SPLIT_FILE}, .*{af.REFERENCE_FILE}"):
        af.load_alpaca_farm(tmp_path)


def test_mismatched_files(tmp_path: Path) -> None:
    split = [{"instruction": "A", "input": "x"}, {"instruction": "B", "input": ""}]
    refs = [{"instruction": "A\n\nx", "output": "ra"}, {"instruction": "C", "output": "rb"}]
    (tmp_path / af.SPLIT_FILE).write_text(json.dumps(split))
    (tmp_path / af.REFERENCE_FILE).write_text(json.dumps(refs))
    with pytest.raises(DataError, match="record 1: instruction in"):
        af.load_alpaca_farm(tmp_path)
    refs[1]["instruction"] = "B"
    (tmp_path / af.REFERENCE_FILE).write_text(json.dumps(refs))
    examples = af.load_alpaca_farm(tmp_path)
    assert [(e.full_instruction, e.reference) for e in examples] == [("A\n\nx", "ra"), ("B", "rb")]


@pytest.fixture(scope="module")
def real() -> list[af.AlpacaFarmExample]:
    if not DATA_DIR.is_dir():
        pytest.skip(f"AlpacaFarm data absent ({DATA_DIR})")
    return af.load_alpaca_farm(DATA_DIR)


def test_load_real_data(real: list[af.AlpacaFarmExample]) -> None:
    assert len(real) == af.N_EXAMPLES == 805
    assert sum(1 for e in real if e.input) == 208
    assert {e.dataset for e in real} == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
    first = real[0]
    assert first.input == ""
    assert first.prompt == (
        "<|user|>\nWhat are the names of some famous actors that started their careers on "
        "Broadway?\n<|assistant|>\n"
    )
    assert first.reference.startswith("Some famous actors that started their careers on Broadway")
    with_input = real[473]
    assert with_input.input.startswith("If you have any questions about my rate")
    assert with_input.prompt == (
        "<|user|>\n" + with_input.instruction + "\n\n" + with_input.input + "\n<|assistant|>\n"
    )
    assert with_input.prompt.startswith("<|user|>\nThe sentence you are given might be too wordy")
