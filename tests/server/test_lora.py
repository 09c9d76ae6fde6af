"""`tulu serve --lora-modules`: requests pick an unmerged LoRA adapter by name, through the
real `openai` and `huggingface_hub` clients, and get what the merged adapter generates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from server.conftest import record_started_apps
from train.conftest import random_adapter
from tulu.engine.engine import LLM, EngineConfig, LLMEngine
from tulu.engine.sampling import SamplingParams
from tulu.model.checkpoint import load_model

peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")

from tulu.train.lora import load_adapter, merge_lora  # noqa: E402

PROMPTS = ["Hello there, tell me", "The quick brown fox", "Once upon a time"]
MAX_TOKENS = 12


def _adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    return random_adapter(base, out, seed=seed, scale=0.3, **lora)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": _adapter(tiny_checkpoint_dir, root / "sql", seed=1),
        "poet": _adapter(tiny_checkpoint_dir, root / "poet", seed=2, r=2, target_modules=["dense"]),
    }


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, tiny_checkpoint_dir, adapters) -> dict[str | None, list[str]]:
    """Greedy texts of each prompt from the base and from each merged adapter."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    texts = {}
    for name in (None, *adapters):
        model = load_model(tiny_checkpoint_dir)
        if name is not None:
            model = merge_lora(load_adapter(model, adapters[name]))
        outputs = LLM(model.eval(), tiny_checkpoint.tokenizer).generate(PROMPTS, params)
        texts[name] = [o.outputs[0].text for o in outputs]
    assert len({tuple(t) for t in texts.values()}) == 3  # the adapters change the text
    return texts


@pytest.fixture
def server(make_server, tiny_checkpoint, tiny_checkpoint_dir, adapters):
    engine = LLMEngine(
        load_model(tiny_checkpoint_dir).eval(),
        tiny_checkpoint.tokenizer,
        EngineConfig(),
        lora_modules=adapters,
    )
    return make_server(engine=engine)


def test_models_lists_the_adapters_as_vllm_does(server, adapters) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "sql", "poet"]
    for name, path in adapters.items():
        entry = models[name].model_dump()
        assert (entry["parent"], entry["root"]) == ("tiny", str(path))
        assert entry["max_model_len"] == models["tiny"].model_dump()["max_model_len"]


def test_openai_requests_pick_their_adapter_concurrently(server, expected) -> None:
    """Completions and chat, streamed and not, for the base and both adapters at once."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none")

    async def complete(model: str, prompt: str, stream: bool) -> str:
        kwargs = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].text
        chunks = await client.completions.create(**kwargs, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def main() -> dict[tuple[str, int, bool], str]:
        jobs = {
            (model, i, stream): complete(model, prompt, stream)
            for model in ("tiny", "sql", "poet")
            for i, prompt in enumerate(PROMPTS)
            for stream in (False, True)
        }
        results = await asyncio.gather(*jobs.values())
        return dict(zip(jobs, results, strict=True))

    got = asyncio.run(main())
    for (model, i, _), text in got.items():
        assert text == expected[None if model == "tiny" else model][i], (model, i)


def test_chat_with_an_adapter_answers_under_its_name(
    server, tiny_checkpoint, tiny_checkpoint_dir, adapters
) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    messages = [{"role": "user", "content": "Write a query"}]
    reply = client.chat.completions.create(
        model="sql", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    merged = merge_lora(load_adapter(load_model(tiny_checkpoint_dir), adapters["sql"]))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    want = LLM(merged.eval(), tiny_checkpoint.tokenizer).generate([messages], params)[0]
    assert reply.model == "sql"
    assert reply.choices[0].message.content == want.outputs[0].text


def test_unknown_models_are_404_naming_the_adapters(server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="sq1", prompt="hi", max_tokens=2)
    message = info.value.body["message"]
    assert "'sq1' does not exist" in message and "LoRA adapters 'sql', 'poet'" in message


def test_tgi_adapter_id_picks_the_adapter(server, expected) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    for adapter_id, name in (("sql", "sql"), (None, None), ("tiny", None)):
        text = client.text_generation(
            PROMPTS[1], max_new_tokens=MAX_TOKENS, adapter_id=adapter_id, stop=[]
        )
        assert text == expected[name][1], adapter_id
    streamed = "".join(
        client.text_generation(
            PROMPTS[2], max_new_tokens=MAX_TOKENS, adapter_id="poet", stream=True
        )
    )
    assert streamed == expected["poet"][2]
    body = {"inputs": "hi", "parameters": {"adapter_id": "x"}}
    response = httpx.post(server.url + "/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "`adapter_id` 'x' is not a loaded adapter; loaded: 'sql', 'poet'" in error


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (["sql"], "--lora-modules: expected NAME=DIR (or a JSON object), got 'sql'"),
        (["=DIR"], "expected NAME=DIR"),
        # vLLM's JSON form ({{ }} are format()'s escaped braces)
        (['{{"name": "sql"'], "is not valid JSON"),
        (['["sql"]'], "expected NAME=DIR"),
        (['{{"name": "sql"}}'], "'path' must be a non-empty string"),
        (['{{"name": "sql", "path": "{sql}", "r": 8}}'], "unknown key 'r'; the keys are"),
        (['{{"name": "sql", "path": "{base}"}}'], "is not a LoRA adapter directory"),
        (["sql={sql}", "sql={poet}"], "the name 'sql' is given twice"),
        (["tiny={sql}"], "'tiny' is the base model's served name"),
        (["sql={base}"], "is not a LoRA adapter directory (no adapter_config.json)"),
    ],
)
def test_bad_lora_modules_are_refused_before_loading(
    tiny_checkpoint_dir, adapters, modules, message, capsys, monkeypatch
) -> None:
    from tulu.cli import main
    from tulu.server import launch

    monkeypatch.setattr(launch, "_graceful_server", lambda config: pytest.fail("it started"))
    paths = {"sql": adapters["sql"], "poet": adapters["poet"], "base": tiny_checkpoint_dir}
    args = ["serve", str(tiny_checkpoint_dir), "--served-model-name", "tiny"]
    args += ["--port", str(_free_port()), "--lora-modules"]
    assert main([*args, *(m.format(**paths) for m in modules)]) == 1
    err = capsys.readouterr().err
    assert message in err and "loaded" not in err


def test_tulu_serve_loads_the_lora_modules(tiny_checkpoint_dir, adapters, monkeypatch) -> None:
    from tulu.cli import main

    started = record_started_apps(monkeypatch)
    args = ["serve", str(tiny_checkpoint_dir), "--port", str(_free_port()), "--lora-modules"]
    poet = {"name": "poet", "path": str(adapters["poet"]), "base_model_name": "x"}  # vLLM's
    assert main([*args, f" sql = {adapters['sql']}", json.dumps(poet)]) == 0
    (app,) = started
    service = app.state.service
    assert service.lora_adapters == {"sql": str(adapters["sql"]), "poet": str(adapters["poet"])}
    assert service.llm.engine.decode_runner is None


def test_runtime_lora_updates_as_vllm(
    make_server, tiny_checkpoint, tiny_checkpoint_dir, adapters, expected
):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's bodies and answers):
    a loaded adapter serves at once and is listed; unloading takes it away."""
    engine = LLMEngine(
        load_model(tiny_checkpoint_dir).eval(), tiny_checkpoint.tokenizer, enable_lora=True
    )
    server = make_server(engine=engine, allow_runtime_lora_updating=True)
    client = openai.OpenAI(base_url=server.base_url, api_key="none")

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server.base_url + path, json=body, timeout=30)

    def complete(model: str) -> str:
        reply = client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].text

    assert [m.id for m in client.models.list().data] == ["tiny"]
    loaded = post("/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["sql"])})
    assert loaded.status_code == 200
    assert loaded.text == "Success: LoRA adapter 'sql' added successfully."
    assert [m.id for m in client.models.list().data] == ["tiny", "sql"]
    assert complete("sql") == expected["sql"][0]

    again = post("/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["poet"])})
    assert (
        again.status_code == 400 and "'sql' is already loaded" in again.json()["error"]["message"]
    )
    missing = post("/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/dir"})
    assert (
        missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    )
    base = post("/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(adapters["sql"])})
    assert base.status_code == 400 and "base model's served name" in base.text

    # unloaded while a stream runs with it (a 400 before): the stream finishes with it
    stream = client.completions.create(
        model="sql", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    removed = post("/unload_lora_adapter", {"lora_name": "sql"})
    text += "".join(chunk.choices[0].text for chunk in chunks)
    assert text == expected["sql"][0]
    assert removed.status_code == 200
    assert removed.text == "Success: LoRA adapter 'sql' removed successfully."
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        complete("sql")
    gone = post("/unload_lora_adapter", {"lora_name": "sql"})
    assert gone.status_code == 404 and "no LoRA adapter named 'sql'" in gone.text

    # loaded again under the same name, another adapter: its own text (no stale cache)
    post("/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["poet"])})
    assert complete("sql") == expected["poet"][0]


def test_runtime_lora_updates_are_off_unless_allowed(server) -> None:
    response = httpx.post(
        server.base_url + "/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"}
    )
    assert response.status_code == 404


def test_tulu_serve_allows_runtime_updates_without_initial_adapters(
    tiny_checkpoint_dir, monkeypatch
) -> None:
    from tulu.cli import main

    started = record_started_apps(monkeypatch)
    args = ["serve", str(tiny_checkpoint_dir), "--port", str(_free_port())]
    assert main([*args, "--allow-runtime-lora-updating"]) == 0
    (app,) = started
    service = app.state.service
    assert service.settings.allow_runtime_lora_updating
    assert service.llm.engine.lora is not None and service.lora_adapters == {}
    assert "/v1/load_lora_adapter" in app.openapi()["paths"]


def test_an_adapter_unloaded_after_the_route_checked_it_is_a_404(
    make_server, tiny_checkpoint, tiny_checkpoint_dir, adapters, monkeypatch
) -> None:
    """The routes check a name against a snapshot of the loaded adapters; an unload can reach
    the engine between that check and the request (or a second unload of the same name). The
    client then gets what an unknown model or adapter gets, a 404 (TGI: 422), as the docs say,
    not a 400 "bad request". The stale snapshot stands in for that race."""
    from tulu.server.service import GenerationService

    engine = LLMEngine(
        load_model(tiny_checkpoint_dir).eval(), tiny_checkpoint.tokenizer, enable_lora=True
    )
    server = make_server(engine=engine, allow_runtime_lora_updating=True)
    stale = {"sql": str(adapters["sql"])}  # what the routes saw; the engine has none
    monkeypatch.setattr(GenerationService, "lora_adapters", property(lambda self: stale))
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError, match="no adapter named 'sql'"):
            client.completions.create(model="sql", prompt="hi", max_tokens=2, stream=stream)
    with pytest.raises(openai.NotFoundError, match="no adapter named 'sql'"):
        client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    gone = httpx.post(server.base_url + "/unload_lora_adapter", json={"lora_name": "sql"})
    assert gone.status_code == 404 and "no LoRA adapter named 'sql'" in gone.text
    assert gone.json()["error"]["param"] == "lora_name"
    body = {"inputs": "hi", "parameters": {"adapter_id": "sql", "max_new_tokens": 2}}
    tgi = httpx.post(server.url + "/generate", json=body)
    assert tgi.status_code == 422 and "no adapter named 'sql'" in tgi.json()["error"]


def test_loading_a_path_the_os_refuses_is_a_400(
    make_server, tiny_checkpoint, tiny_checkpoint_dir, tmp_path
) -> None:
    """An adapter path that cannot be looked up (a name too long; a directory without
    permission) answered 500 "internal error: OSError"; it is the request's bad path."""
    engine = LLMEngine(
        load_model(tiny_checkpoint_dir).eval(), tiny_checkpoint.tokenizer, enable_lora=True
    )
    server = make_server(engine=engine, allow_runtime_lora_updating=True)
    body = {"lora_name": "x", "lora_path": str(tmp_path / ("a" * 300))}
    response = httpx.post(server.base_url + "/load_lora_adapter", json=body, timeout=30)
    assert response.status_code == 400
    assert "LoRA adapter 'x': cannot read" in response.json()["error"]["message"]
    assert server.service.lora_adapters == {} and server.service.llm.is_running


def test_the_optional_fields_of_vllms_bodies_are_accepted(
    make_server, tiny_checkpoint, tiny_checkpoint_dir, adapters
) -> None:
    """vLLM's bodies also have `lora_int_id` (unload) and `load_inplace` (load): clients that
    send them were refused as unknown fields. Replacing a loaded adapter in place is refused,
    saying so."""
    engine = LLMEngine(
        load_model(tiny_checkpoint_dir).eval(), tiny_checkpoint.tokenizer, enable_lora=True
    )
    server = make_server(engine=engine, allow_runtime_lora_updating=True)

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server.base_url + path, json=body, timeout=30)

    sql = str(adapters["sql"])
    body = {"lora_name": "sql", "lora_path": sql, "load_inplace": False}
    assert post("/load_lora_adapter", body).status_code == 200
    inplace = post("/load_lora_adapter", {**body, "load_inplace": True})
    message = inplace.json()["error"]["message"]
    assert inplace.status_code == 400 and "unload 'sql' first" in message
    assert message.startswith("load_inplace: replacing a loaded adapter is not supported")
    assert post("/unload_lora_adapter", {"lora_name": "sql", "lora_int_id": 1}).status_code == 200
    # in place of nothing: a plain load, as in vLLM
    assert post("/load_lora_adapter", {**body, "load_inplace": True}).status_code == 200
    assert server.service.lora_adapters == {"sql": sql}


def test_metrics_count_requests_per_adapter(server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    for model in ("sql", "sql", "poet", "tiny"):
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert 'tulu_lora_requests_total{adapter="sql"} 2.0' in text
    assert 'tulu_lora_requests_total{adapter="poet"} 1.0' in text
    assert "tulu_lora_adapters_loaded 2.0" in text
    assert 'adapter="tiny"' not in text  # the base is not an adapter
