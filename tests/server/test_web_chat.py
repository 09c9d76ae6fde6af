"""The web chat page (`/`), driven in headless Chromium against a live server on 127.0.0.1.

A person's view of `tulu serve`: the page is loaded in a real browser (Debian's chromium,
driven by selenium through Debian's chromedriver), a message is typed and sent, the reply
streams in, a second turn carries the whole conversation, Stop aborts a reply, and rejected
requests show the server's error in the conversation. A screenshot of the conversation is
saved under the test's tmp dir and copied to `runs/screenshots/web-chat.png` (and one with
errors to `web-chat-errors.png`).

The server is a real uvicorn on a free port running `create_app` with the tiny random model of
conftest's `tiny_checkpoint` and an API key. An ASGI wrapper around the app records the bodies
POSTed to /v1/chat/completions (so the test sees what the page sent), can slow the response
down (so Stop can be clicked mid-reply) and can answer with a canned event stream cut into
small pieces (so the page's SSE parser meets split lines and an error event).

Skipped, with the reason, when selenium, chromium or chromedriver is missing
(`.ci/install-browser.sh` installs the browser and driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tulu.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from tulu.server.app import create_app  # noqa: E402
from tulu.server.service import ServerSettings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "runs" / "screenshots"
API_KEY = "web-chat-secret"
MODEL_NAME = "tiny"
WAIT = 60  # seconds for anything the page waits on the server for

CHROMIUM = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if (found := shutil.which(name))
    ),
    None,
)
CHROMEDRIVER = shutil.which("chromedriver")
# Headless flags for a closed network: no sandbox as root, and no background connections.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
]

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (.ci/install-browser.sh)"
    ),
    pytest.mark.skipif(
        CHROMEDRIVER is None, reason="chromedriver is not installed (.ci/install-browser.sh)"
    ),
]


# ---------------------------------------------------------------------------- live server
class ChatRecorder:
    """ASGI wrapper: records /v1/chat/completions request bodies; can slow or replace replies."""

    PATH = "/v1/chat/completions"

    def __init__(self, app):
        self.app = app
        self.bodies: list[dict] = []
        self.delay = 0.0  # seconds before each response body chunk
        self.canned: bytes | None = None  # answer with this event stream instead of the app
        self.extra: dict = {}  # fields merged into the request body the app receives
        self.piece = 7  # bytes per chunk of the canned stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.PATH:
            await self.app(scope, receive, send)
            return
        # Read the whole body first (the API-key check may answer without reading it), then
        # replay it to the app; later receive() calls (disconnect) go to the server.
        parts: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        self.bodies.append(json.loads(body or b"null"))
        if self.extra:
            body = json.dumps({**self.bodies[-1], **self.extra}).encode()
        replayed = False

        async def replaying_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if self.canned is not None:
            await self._answer_canned(send)
            return

        delay = self.delay

        async def slow_send(message):
            if delay and message["type"] == "http.response.body":
                await asyncio.sleep(delay)
            await send(message)

        await self.app(scope, replaying_receive, slow_send)

    async def _answer_canned(self, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        data = self.canned
        for start in range(0, len(data), self.piece):
            await send(
                {
                    "type": "http.response.body",
                    "body": data[start : start + self.piece],
                    "more_body": True,
                }
            )
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class LiveServer:
    def __init__(self, base_url: str, recorder: ChatRecorder, app):
        self.base_url = base_url
        self.recorder = recorder
        self.app = app

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def post_chat(self, body: dict, api_key: str = API_KEY) -> httpx.Response:
        return httpx.post(
            self.url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=WAIT,
        )


@pytest.fixture(scope="module")
def chat_server(tiny_checkpoint):
    """A live server (its own, not conftest's `launch_server`: the recorder wraps the app)."""
    engine = LLMEngine(tiny_checkpoint.model, tiny_checkpoint.tokenizer, EngineConfig())
    with live_server(engine) as server:
        yield server


@contextlib.contextmanager
def live_server(engine: LLMEngine, **settings_fields):
    """uvicorn serving `engine` as MODEL_NAME, with API_KEY, behind a ChatRecorder."""
    tokenizer = engine.tokenizer
    settings = ServerSettings(
        served_model_name=MODEL_NAME, api_key=API_KEY, drain_timeout=1.0, **settings_fields
    )
    app = create_app(engine, tokenizer, settings)
    recorder = ChatRecorder(app)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        recorder, log_level="warning", lifespan="on", timeout_graceful_shutdown=3, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="web-chat-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", recorder, app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# ---------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as err:
        pytest.fail(f"chromium did not start under chromedriver: {err.msg} (log: {log})")
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.execute_script("return document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what} (page status: {status!r})") from None


def text_of(driver, element) -> str:
    """The element's exact text (textContent keeps newlines and spaces as the model sent them)."""
    return driver.execute_script("return arguments[0].textContent", element)


def bubbles(driver, kind: str):
    return driver.find_elements(By.CSS_SELECTOR, f"#messages .msg.{kind}")


def slow_unending_replies(driver, server) -> None:
    """A fresh page whose next reply streams slowly for 300 tokens (greedy, EOS ignored), for
    tests that act while it streams; the caller resets server.recorder's delay and extra."""
    open_page(driver, server)
    driver.find_element(By.ID, "new-chat").click()
    set_field(driver, "system", "")
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "300")
    server.recorder.delay = 0.25
    server.recorder.extra = {"ignore_eos": True}


def first_reply_text(driver) -> str:
    """The text streamed so far into the first reply ("" before any)."""
    replies = bubbles(driver, "assistant")
    return text_of(driver, replies[0].find_element(By.CLASS_NAME, "content")) if replies else ""


def idle(driver) -> bool:
    return driver.execute_script("return document.body.dataset.state") == "idle"


def set_field(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    if value:
        element.send_keys(value)


def history(driver) -> list[dict]:
    return driver.execute_script("return window.tuluChat.history")


def open_page(driver, server: LiveServer) -> None:
    """Load `/` with a fresh conversation and the API key entered (it is kept in localStorage)."""
    driver.get(server.url("/"))
    key = driver.find_element(By.ID, "api-key")
    if key.get_attribute("value") != API_KEY:
        key.clear()
        key.send_keys(API_KEY, Keys.TAB)
    wait_for(
        driver,
        lambda d: "ok" in d.find_element(By.ID, "model").get_attribute("class").split(),
        "the model to be listed",
    )
    assert driver.find_element(By.ID, "model").text == MODEL_NAME
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []


def send_and_wait(driver, text: str, *, press_enter: bool = True) -> None:
    done_before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg"))
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    if press_enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()
    wait_for(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .msg")) > done_before and idle(d),
        "the reply to finish",
    )


# ---------------------------------------------------------------------------- tests
def test_conversation_streams_and_keeps_its_history(chat_server, browser, tmp_path):
    driver, server = browser, chat_server
    driver.get(server.url("/"))
    driver.execute_script("localStorage.clear()")  # a first visit: no key, default settings
    driver.refresh()

    # The server wants an API key: the page says so until one is entered, then names the model.
    wait_for(driver, lambda d: "API key" in d.find_element(By.ID, "status").text, "the key hint")
    assert driver.find_element(By.ID, "model").text == "model unavailable"
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(API_KEY, Keys.TAB)
    wait_for(driver, lambda d: d.find_element(By.ID, "model").text == MODEL_NAME, "the model name")
    assert driver.execute_script("return localStorage.getItem('tulu.apiKey')") == API_KEY

    set_field(driver, "system", "You are a helpful assistant.")
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "16")

    # Shift+Enter is a newline, not a send.
    box = driver.find_element(By.ID, "message")
    box.send_keys("Hello")
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    box.send_keys("there")
    assert box.get_attribute("value") == "Hello\nthere"
    assert bubbles(driver, "user") == []

    # Enter sends; the reply streams into an assistant bubble.
    sent_before = len(server.recorder.bodies)
    box.send_keys(Keys.ENTER)
    wait_for(
        driver,
        lambda d: any(
            text_of(d, b.find_element(By.CLASS_NAME, "content")) for b in bubbles(d, "assistant")
        ),
        "streamed text in the assistant bubble",
    )
    wait_for(driver, idle, "the first reply to finish")
    assert box.get_attribute("value") == ""
    first_request = server.recorder.bodies[sent_before]
    assert first_request["stream"] is True
    assert first_request["model"] == MODEL_NAME
    assert first_request["temperature"] == 0
    assert first_request["max_tokens"] == 16
    assert first_request["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello\nthere"},
    ]
    [first_reply] = bubbles(driver, "assistant")
    assert first_reply.get_attribute("data-status") == "done"
    first_text = text_of(driver, first_reply.find_element(By.CLASS_NAME, "content"))
    assert first_text
    # Greedy: the streamed text is exactly what the server answers without streaming.
    reference = server.post_chat({**first_request, "stream": False})
    assert reference.status_code == 200, reference.text
    assert first_text == reference.json()["choices"][0]["message"]["content"]
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .error")

    # The second turn (sent with the button) carries the whole conversation.
    sent_before = len(server.recorder.bodies)
    send_and_wait(driver, "And what else?", press_enter=False)
    second_request = server.recorder.bodies[sent_before]
    assert second_request["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "And what else?"},
    ]
    users, replies = bubbles(driver, "user"), bubbles(driver, "assistant")
    assert [text_of(driver, u.find_element(By.CLASS_NAME, "content")) for u in users] == [
        "Hello\nthere",
        "And what else?",
    ]
    assert len(replies) == 2 and all(r.get_attribute("data-status") == "done" for r in replies)
    second_text = text_of(driver, replies[1].find_element(By.CLASS_NAME, "content"))
    reference = server.post_chat({**second_request, "stream": False})
    assert second_text == reference.json()["choices"][0]["message"]["content"]
    # The bubbles alternate user / assistant in order.
    kinds = [
        e.get_attribute("class").split()[1]
        for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg")
    ]
    assert kinds == ["user", "assistant", "user", "assistant"]
    assert len(history(driver)) == 4

    save_screenshot(driver, tmp_path / "web-chat.png")

    # New chat empties the conversation; the next request has no history.
    driver.find_element(By.ID, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    assert driver.find_element(By.ID, "empty").is_displayed()
    assert history(driver) == []
    sent_before = len(server.recorder.bodies)
    send_and_wait(driver, "Fresh start")
    assert [m["role"] for m in server.recorder.bodies[sent_before]["messages"]] == [
        "system",
        "user",
    ]


def test_stop_aborts_the_reply_and_keeps_what_arrived(chat_server, browser):
    """Stop keeps the text that arrived and the server drops the request. The engine is slowed
    to 50 steps/s and the reply cannot end early (ignore_eos), so a server that kept
    generating after the browser left would run all 300 steps, where an abort stops it
    within about a second of the click."""
    driver, server = browser, chat_server
    slow_unending_replies(driver, server)  # so that Stop can land mid-stream
    steps = []
    embed = server.app.state.service.llm.engine.model.gpt_neox.embed_in

    def slow_step(*_) -> None:  # returns None: a forward hook's return value replaces the output
        steps.append(1)
        time.sleep(0.02)

    hook = embed.register_forward_hook(slow_step)
    try:
        box = driver.find_element(By.ID, "message")
        box.send_keys("Tell me a story", Keys.ENTER)
        wait_for(driver, first_reply_text, "the first streamed text")
        assert driver.find_element(By.ID, "send").get_attribute("disabled") is not None
        driver.find_element(By.ID, "stop").click()
        wait_for(driver, idle, "the page to stop", timeout=5)
        service = server.app.state.service
        engine = service.llm.engine
        deadline = time.monotonic() + 15
        while (service.in_flight or engine.num_unfinished_requests) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        hook.remove()
        server.recorder.delay = 0.0
        server.recorder.extra = {}
    [reply] = bubbles(driver, "assistant")
    assert reply.get_attribute("data-status") == "stopped"
    partial = text_of(driver, reply.find_element(By.CLASS_NAME, "content"))
    assert partial
    assert history(driver) == [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": partial},
    ]
    assert "Stopped" in driver.find_element(By.ID, "status").text
    assert driver.find_element(By.ID, "stop").get_attribute("disabled") is not None
    # The server noticed the disconnect and dropped the request.
    assert service.in_flight == 0 and engine.num_unfinished_requests == 0
    assert engine.pool.num_used == 0  # every KV block went back
    assert len(steps) < 250, (
        f"the server kept generating after the browser aborted the streamed request "
        f"({len(steps)} engine steps of 300): the streaming route must abort the engine "
        "request when the client disconnects"
    )


def save_screenshot(driver, path: Path) -> None:
    """Save a PNG under the test's tmp dir and copy it to runs/screenshots/ when possible."""
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    try:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / path.name)
    except OSError:
        pass  # a read-only checkout: the copy under tmp_path is enough


def test_rejected_requests_show_the_servers_error(chat_server, browser, tmp_path):
    driver, server = browser, chat_server
    open_page(driver, server)
    driver.find_element(By.ID, "new-chat").click()
    set_field(driver, "temperature", "0")

    # Too many new tokens for the context window: 400 with the server's message.
    set_field(driver, "max-tokens", "100000")
    send_and_wait(driver, "Tell me everything")
    sent = server.recorder.bodies[-1]
    assert sent["max_tokens"] == 100000
    expected = server.post_chat(sent)
    assert expected.status_code == 400
    message = expected.json()["error"]["message"]
    [error] = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
    error_text = text_of(driver, error.find_element(By.CLASS_NAME, "content"))
    assert "400" in error_text and message in error_text
    assert bubbles(driver, "assistant") == []
    [user] = bubbles(driver, "user")
    assert "failed" in user.get_attribute("class").split()
    assert history(driver) == []  # the failed turn is not part of the conversation
    assert "New chat" in driver.find_element(By.ID, "status").text  # a hint for a way out
    # The text is given back for a retry, which now succeeds.
    box = driver.find_element(By.ID, "message")
    assert box.get_attribute("value") == "Tell me everything"
    set_field(driver, "max-tokens", "8")
    box.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: bubbles(d, "assistant") and idle(d), "the retried reply")
    assert [m["role"] for m in history(driver)] == ["user", "assistant"]

    # A wrong API key: 401 with the server's message.
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("wrong-key", Keys.TAB)
    wait_for(
        driver,
        lambda d: (
            "bad" in d.find_element(By.ID, "model").get_attribute("class").split()
            and "Check the API key" in d.find_element(By.ID, "status").text
        ),
        "the page to notice the wrong key",
    )
    sent_before = len(server.recorder.bodies)
    send_and_wait(driver, "Who am I?")
    # The request was sent (with the conversation so far) and rejected.
    assert [m["content"] for m in server.recorder.bodies[sent_before]["messages"]][::2] == [
        "Tell me everything",
        "Who am I?",
    ]
    errors = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
    assert len(errors) == 2
    expected = server.post_chat(server.recorder.bodies[sent_before], api_key="wrong-key")
    assert expected.status_code == 401
    error_text = text_of(driver, errors[-1].find_element(By.CLASS_NAME, "content"))
    assert "401" in error_text and expected.json()["error"]["message"] in error_text
    assert [m["role"] for m in history(driver)] == ["user", "assistant"]
    save_screenshot(driver, tmp_path / "web-chat-errors.png")
    key.clear()
    key.send_keys(API_KEY, Keys.TAB)  # the stored key is right again for later tests
    wait_for(
        driver,
        lambda d: "ok" in d.find_element(By.ID, "model").get_attribute("class").split(),
        "the model to be listed again",
    )


def test_streamed_events_split_across_reads_and_error_events(chat_server, browser):
    """The SSE parser: lines cut at arbitrary bytes, comments, CRLF, and a `data: {"error"}`."""
    driver, server = browser, chat_server
    open_page(driver, server)
    driver.find_element(By.ID, "new-chat").click()

    def event(delta: str | None = None, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
        return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]})

    good = (
        ": keep-alive comment\n\n"
        + event("Hé")
        + "\r\n\r\n"
        + event(" <b>not bold</b>")
        + "\n\n"
        + event("\n🌷 ünïcode", "stop")
        + "\n\ndata: [DONE]\n\n"
    )
    server.recorder.canned = good.encode()
    server.recorder.piece = 5  # cuts through multi-byte characters too
    try:
        send_and_wait(driver, "parse this")
        [reply] = bubbles(driver, "assistant")
        content = reply.find_element(By.CLASS_NAME, "content")
        assert text_of(driver, content) == "Hé <b>not bold</b>\n🌷 ünïcode"
        assert content.find_elements(By.TAG_NAME, "b") == []  # rendered as text, never as HTML
        assert reply.get_attribute("data-status") == "done"

        server.recorder.canned = (
            event("partial") + "\n\n" + 'data: {"error": {"message": "the engine stopped"}}\n\n'
        ).encode()
        send_and_wait(driver, "fail midway")
        [error] = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        assert "the engine stopped" in text_of(driver, error)
        assert [m["content"] for m in history(driver)] == [
            "parse this",
            "Hé <b>not bold</b>\n🌷 ünïcode",
        ]

        # A stream that ends without [DONE] or a finish_reason was cut off: an error too.
        server.recorder.canned = (event("cut") + "\n\n").encode()
        send_and_wait(driver, "cut me off")
        errors = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        assert len(errors) == 2
        assert "closed before the reply was complete" in text_of(driver, errors[-1])
        assert len(history(driver)) == 2
    finally:
        server.recorder.canned = None


# ---------------------------------------------------------------------------- LoRA adapters
@pytest.fixture(scope="module")
def lora_chat_server(tiny_checkpoint, tiny_checkpoint_dir, tmp_path_factory):
    """A live server with two LoRA adapters (`tulu serve --lora-modules`)."""
    pytest.importorskip("peft")
    from train.conftest import random_adapter
    from tulu.model.checkpoint import load_model

    root = tmp_path_factory.mktemp("web-chat-adapters")
    adapters = {
        name: random_adapter(tiny_checkpoint_dir, root / name, seed=seed, scale=0.3)
        for seed, name in enumerate(("sql", "poet"), start=1)
    }
    model = load_model(tiny_checkpoint_dir).eval()
    engine = LLMEngine(model, tiny_checkpoint.tokenizer, EngineConfig(), lora_modules=adapters)
    with live_server(engine, allow_runtime_lora_updating=True) as server:
        yield server


def test_the_adapter_picker_sends_the_chosen_adapter(lora_chat_server, browser):
    """With adapters, the page offers the base and each adapter; a reply comes from the one
    chosen (the same text as the API gives for that model), and the choice can change within
    a conversation."""
    from selenium.webdriver.support.ui import Select

    server, driver = lora_chat_server, browser
    open_page(driver, server)
    picker = driver.find_element(By.ID, "adapter")
    wait_for(driver, lambda d: picker.is_displayed(), "the adapter picker")
    options = [(o.get_attribute("value"), o.text) for o in Select(picker).options]
    assert options == [("tiny", "base model"), ("sql", "LoRA: sql"), ("poet", "LoRA: poet")]
    assert Select(picker).first_selected_option.get_attribute("value") == "tiny"
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "12")

    replies = []
    for model in ("sql", "tiny"):
        Select(picker).select_by_value(model)
        send_and_wait(driver, "Write a query")
        body = server.recorder.bodies[-1]
        assert body["model"] == model
        expected = server.post_chat({k: v for k, v in body.items() if k != "stream"})
        assert expected.status_code == 200, expected.text
        content = bubbles(driver, "assistant")[-1].find_element(By.CLASS_NAME, "content")
        replies.append(text_of(driver, content))
        assert replies[-1] == expected.json()["choices"][0]["message"]["content"]
    # the two turns were answered by different models (the adapter changes the text)
    base_alone = server.post_chat(
        {
            "model": "tiny",
            "messages": server.recorder.bodies[0]["messages"],
            "temperature": 0,
            "max_tokens": 12,
        }
    )
    assert base_alone.json()["choices"][0]["message"]["content"] != replies[0]


def test_the_picker_drops_an_adapter_unloaded_while_chosen(lora_chat_server, browser):
    """Runtime LoRA updates: the chosen adapter is unloaded; the next message gets the 404
    in the conversation and the picker re-reads the list (back on the base)."""
    from selenium.webdriver.support.ui import Select

    server, driver = lora_chat_server, browser
    open_page(driver, server)
    picker = driver.find_element(By.ID, "adapter")
    wait_for(driver, lambda d: picker.is_displayed(), "the adapter picker")
    Select(picker).select_by_value("poet")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    poet = server.app.state.service.lora_adapters["poet"]
    unloaded = httpx.post(
        server.url("/v1/unload_lora_adapter"), json={"lora_name": "poet"}, headers=headers
    )
    assert unloaded.status_code == 200, unloaded.text
    try:
        send_and_wait(driver, "Still there?")
        [error] = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        assert "'poet' does not exist" in text_of(driver, error)
        options = "return [...document.getElementById('adapter').options].map(o => o.value)"
        wait_for(
            driver,
            lambda d: d.execute_script(options) == ["tiny", "sql"],
            "the picker to drop the unloaded adapter",
        )
        assert driver.execute_script("return document.getElementById('adapter').value") == "tiny"
    finally:  # put it back for the module's other tests
        body = {"lora_name": "poet", "lora_path": poet}
        httpx.post(server.url("/v1/load_lora_adapter"), json=body, headers=headers)


def test_new_chat_during_a_reply_starts_an_empty_conversation(chat_server, browser):
    """New chat mid-reply aborts it; the text that had arrived belongs to the old
    conversation and must not leak into the new one (and so into its next request)."""
    driver, server = browser, chat_server
    slow_unending_replies(driver, server)  # so that New chat can land mid-stream
    try:
        driver.find_element(By.ID, "message").send_keys("Tell me a story", Keys.ENTER)
        wait_for(driver, first_reply_text, "the first streamed text")
        driver.find_element(By.ID, "new-chat").click()
        wait_for(driver, idle, "the page to stop", timeout=5)
    finally:
        server.recorder.delay = 0.0
        server.recorder.extra = {}
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    assert history(driver) == []
    sent_before = len(server.recorder.bodies)
    set_field(driver, "max-tokens", "4")
    send_and_wait(driver, "Fresh start")
    assert server.recorder.bodies[sent_before]["messages"] == [
        {"role": "user", "content": "Fresh start"}
    ]


def test_a_number_box_that_is_not_a_number_is_refused(chat_server, browser):
    """A number box holding text that is not a number ("1e") reads as empty in the DOM; the
    page must say so, not send the request without it (the server's default temperature, or
    a reply that fills the context window)."""
    driver, server = browser, chat_server
    open_page(driver, server)
    driver.find_element(By.ID, "new-chat").click()
    for box, name in (("temperature", "Temperature"), ("max-tokens", "Max tokens")):
        set_field(driver, "temperature", "0")
        set_field(driver, "max-tokens", "4")
        set_field(driver, box, "1e")
        sent_before = len(server.recorder.bodies)
        driver.find_element(By.ID, "message").send_keys("Hello", Keys.ENTER)
        wait_for(
            driver,
            lambda d, name=name: f"{name} is not a number" in d.find_element(By.ID, "status").text,
            f"the page to refuse the {box} box",
        )
        assert len(server.recorder.bodies) == sent_before  # nothing was sent
        assert driver.find_element(By.ID, "message").get_attribute("value") == "Hello"
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
        driver.find_element(By.ID, "message").clear()
    set_field(driver, "max-tokens", "4")
    send_and_wait(driver, "Hello")
    assert server.recorder.bodies[-1]["temperature"] == 0
    assert server.recorder.bodies[-1]["max_tokens"] == 4
