"""vLLM's /tokenize and /detokenize: the ids a generation request sees, and their text back.

The counts must be those the generation routes use (a client budgets its prompt with them),
checked against the chat completions' own usage; errors come in OpenAI's shape, as vLLM's.
"""

from __future__ import annotations

import httpx
import pytest

from tulu.chat import generation_prompt

API_KEY = "tok-key"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def server(launch_server):
    running = launch_server(api_key=API_KEY, served_model_name="tiny")
    yield running
    running.stop()


def post(server, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def test_tokenize_a_prompt(server) -> None:
    text = "The quick brown fox, naïvely 🦊"
    reply = post(server, "/tokenize", {"model": "tiny", "prompt": text})
    assert reply.status_code == 200, reply.text
    ids = server.tokenizer.encode(text)
    assert reply.json() == {
        "count": len(ids),
        "max_model_len": server.engine.max_model_len,
        "tokens": ids,
        "token_strs": None,
    }
    pieces = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert pieces["token_strs"] == [server.tokenizer.id_to_token(i) for i in ids]


def test_tokenize_messages_counts_what_a_chat_completion_uses(server) -> None:
    reply = post(server, "/tokenize", {"messages": MESSAGES})
    assert reply.status_code == 200, reply.text
    text = generation_prompt(MESSAGES, server.tokenizer.eos_token)
    assert reply.json()["tokens"] == server.tokenizer.encode(text)
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert reply.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    # without the generation prompt: the conversation alone, without the assistant header
    bare = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert server.tokenizer.decode(bare.json()["tokens"]) == text.removesuffix("<|assistant|>\n")


def test_detokenize_inverts_tokenize(server) -> None:
    text = "Hello, wörld!\nSecond line."
    ids = post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    reply = post(server, "/detokenize", {"model": "tiny", "tokens": ids})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"prompt": text}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"),
    [
        ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model", "'gpt-4' does not exist"),
        ("/tokenize", {"prompt": 5}, 400, "prompt", "prompt"),
        ("/tokenize", {"prompt": "x", "temperature": 1}, 400, "temperature", "temperature"),
        (
            "/tokenize",
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
            "role",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            400,
            "continue_final_message",
            "not supported",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "chat_template": "{{ x }}"},
            400,
            "chat_template",
            "always in the Tulu format",
        ),
        ("/tokenize", {"prompt": ""}, 200, None, None),  # zero tokens is a count, not an error
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens", "tokens[1] is -1, outside"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0", "tokens"),
    ],
)
def test_bad_requests_are_openai_errors(server, path, body, status, param, message) -> None:
    reply = post(server, path, body)
    assert reply.status_code == status, reply.text
    if status == 200:
        return
    error = reply.json()["error"]
    assert error["code"] == status and error["param"] == param
    assert message in error["message"]


def test_the_api_key_is_required(server) -> None:
    reply = post(server, "/tokenize", {"prompt": "x"}, key=None)
    assert reply.status_code == 401
    assert "API key" in reply.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_json_without_a_json_content_type_says_so(server, path, content_type) -> None:
    """`curl -d '{...}'` sends a form's Content-Type: /tokenize (whose body is a plain dict,
    told apart by `messages`) answered "body: Input should be a valid dictionary" instead of
    naming the header, as every other route does."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    body = b'{"prompt": "Hi"}' if path == "/tokenize" else b'{"tokens": [1]}'
    reply = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
    assert reply.status_code == 400, reply.text
    assert "Content-Type: application/json" in reply.json()["error"]["message"], reply.text
