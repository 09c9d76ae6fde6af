"""The FastAPI app: lifespan (engine thread), API keys, error shapes, metrics, static page.

Two API families share one app and answer errors in their own shapes:
- `/v1/...` (OpenAI): `{"error": {"message", "type", "param", "code"}}`, 400 for invalid input;
- everything else (TGI): `{"error": "...", "error_type": "..."}`, 422 for invalid input.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tulu import __version__
from tulu.engine.async_engine import AsyncLLM, EngineDeadError
from tulu.engine.engine import LLMEngine
from tulu.engine.lora import UnknownLoraAdapter
from tulu.errors import TuluError
from tulu.server.metrics import ServerMetrics
from tulu.server.service import (
    ClientDisconnected,
    GenerationService,
    Overloaded,
    RequestTimedOut,
    ServerSettings,
)
from tulu.tokenizer import Tokenizer

log = logging.getLogger("tulu.server")
STATIC = Path(__file__).parent / "static"
# Reachable without the API key, for GET/HEAD only: POST / is TGI's generation route.
PUBLIC_PATHS = {"/", "/health", "/favicon.ico"}


def is_openai(path: str) -> bool:
    """Whether a path answers errors in OpenAI's shape: the /v1 API, and vLLM's /tokenize and
    /detokenize beside it."""
    return path.startswith("/v1/") or path in ("/v1", "/tokenize", "/detokenize")


def error_response(
    path: str, status: int, message: str, kind: str, param: str | None = None
) -> JSONResponse:
    """An error in the shape the route's API family uses."""
    if is_openai(path):
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    else:
        body = {"error": message, "error_type": kind}
    return JSONResponse(body, status_code=status)


#: Names pydantic puts in an error's location for the member of a union that failed
#: ("prompt.list[int].0"); none is a field of a request.
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "bytes"})


def _field_of(loc: list[str]) -> str | None:
    """The request field an error location names: up to the union member, if any
    (``prompt.list[int].0`` is an error in the field ``prompt``)."""
    for depth, part in enumerate(loc):
        if "[" in part or part in _UNION_MEMBERS:
            loc = loc[:depth]
            break
    return ".".join(loc) or None


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for item in err.errors():
        loc = [str(x) for x in item.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        kind = item.get("type", "")
        if kind == "json_invalid":
            # FastAPI's loc is ("body", <character offset>): a position, not a parameter.
            at = f" at character {where}" if where else ""
            reason = item.get("ctx", {}).get("error", item.get("msg"))
            parts.append(f"the request body is not valid JSON{at} ({reason})")
            continue
        if (
            kind in ("model_attributes_type", "dict_type")
            and not loc
            and isinstance(item.get("input"), bytes)
        ):
            # FastAPI parses the body as JSON only when the Content-Type says so; otherwise
            # the object (a model, or /tokenize's plain dict) gets the raw bytes (`curl -d`
            # sends a form's Content-Type).
            parts.append(
                "the request body was not read as JSON: send it with "
                "'Content-Type: application/json'"
            )
            continue
        param = param or _field_of(loc)
        if kind == "missing" and not loc:
            parts.append("the request body is empty; a JSON object is required")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        else:
            parts.append(f"{where or 'body'}: {item.get('msg')}")
    return "; ".join(parts) or "invalid request", param


class BodyTooLarge(TuluError, StarletteHTTPException):
    """A chunked request body ran past the size limit (HTTP 413).

    Also an HTTPException because FastAPI re-raises those from its body parsing, while any
    other exception there becomes a bare 400 "There was an error parsing the body".
    """

    def __init__(self, message: str):
        StarletteHTTPException.__init__(self, 413, message)

    def __str__(self) -> str:
        return str(self.detail)


class ApiKeyAndMetricsMiddleware:
    """Checks the API key (constant-time) and counts requests by route and status.

    A plain ASGI middleware rather than `BaseHTTPMiddleware`, so streaming responses and
    client disconnects pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        metrics: ServerMetrics,
        max_body_bytes: int,
        route_paths: frozenset[str] = frozenset(),
    ):
        self.app = app
        self.route_paths = route_paths
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = {"code": 500}

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            public = path in PUBLIC_PATHS and scope["method"] in ("GET", "HEAD")
            if self.api_key and not public and not self._authorised(scope):
                response = error_response(
                    path,
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    "authentication_error",
                )
                await response(scope, receive, send_and_count)
                return
            if self._declared_length(scope) > self.max_body_bytes:
                response = error_response(
                    path,
                    413,
                    f"the request body is larger than {self.max_body_bytes} bytes",
                    "request_too_large",
                )
                await response(scope, receive, send_and_count)
                return
            await self.app(scope, self._limited(receive), send_and_count)
        finally:
            label = self._route_label(scope)
            self.metrics.requests.labels(route=label, status=str(status["code"])).inc()

    def _route_label(self, scope: Scope) -> str:
        """The route's path template. When this middleware answered itself (401, 413) the
        router never ran; the path is then looked up among the app's paths (all static), so
        refused requests are counted under their route rather than as "unmatched"."""
        path = getattr(scope.get("route"), "path", None)
        if path is None and scope["path"] in self.route_paths:
            path = scope["path"]
        return path or "unmatched"

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def _limited(self, receive: Receive) -> Receive:
        """A body sent without Content-Length (chunked) is cut off at the limit too."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(
                        f"the request body is larger than {self.max_body_bytes} bytes"
                    )
            return message

        return limited_receive

    def _authorised(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and not given:
                given = value.strip()
        return hmac.compare_digest(given, self.api_key)


def create_app(engine: LLMEngine, tokenizer: Tokenizer, settings: ServerSettings) -> FastAPI:
    """The app for one engine; the engine thread starts with the app and drains on shutdown."""
    llm = AsyncLLM(engine)
    metrics = ServerMetrics(llm.stats)
    service = GenerationService(
        llm, tokenizer, settings, metrics, engine.max_model_len, engine.window_name
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        try:
            yield
        finally:
            await llm.shutdown(settings.drain_timeout)
            service.close()

    app = FastAPI(title="tulu", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        status = 400 if is_openai(request.url.path) else 422
        return error_response(
            request.url.path,
            status,
            message,
            "invalid_request_error" if status == 400 else "validation",
            param,
        )

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, err: Overloaded):
        kind = "rate_limit_exceeded" if is_openai(request.url.path) else "overloaded"
        return error_response(request.url.path, 429, str(err), kind)

    @app.exception_handler(RequestTimedOut)
    async def on_timeout(request: Request, err: RequestTimedOut):
        return error_response(request.url.path, 504, str(err), "timeout")

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, err: BodyTooLarge):
        return error_response(request.url.path, 413, str(err), "request_too_large")

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(request: Request, err: ClientDisconnected):
        return error_response(request.url.path, 499, str(err), "client_closed")

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(request: Request, err: EngineDeadError):
        return error_response(request.url.path, 503, str(err), "engine_unavailable")

    @app.exception_handler(TuluError)
    async def on_tulu_error(request: Request, err: TuluError):
        status = 400 if is_openai(request.url.path) else 422
        kind = "invalid_request_error" if status == 400 else "validation"
        return error_response(request.url.path, status, str(err), kind)

    @app.exception_handler(UnknownLoraAdapter)
    async def on_unknown_adapter(request: Request, err: UnknownLoraAdapter):
        # The route found the adapter, then it was unloaded before the request reached the
        # engine: what an unknown `model` gets (OpenAI 404; TGI answers any bad adapter_id 422).
        if not is_openai(request.url.path):
            return await on_tulu_error(request, err)
        return error_response(request.url.path, 404, str(err), "not_found_error", "model")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        return error_response(
            request.url.path, err.status_code, str(err.detail), kinds.get(err.status_code, "error")
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            request.url.path, 500, f"internal error: {type(err).__name__}", "internal_error"
        )

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health():
        # Says why: the engine's failure (for whoever reads the orchestrator's restart log),
        # or that the server is draining, so a load balancer stops sending.
        try:
            llm.check_health()
        except EngineDeadError as err:
            return error_response("/health", 503, str(err), "unhealthy")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    from tulu.server.openai_routes import router as openai_router
    from tulu.server.tgi_routes import router as tgi_router

    routers = [openai_router, tgi_router]
    if settings.allow_runtime_lora_updating:
        from tulu.server.lora_routes import router as lora_router

        routers.append(lora_router)
    for router in routers:
        app.include_router(router)
    # This FastAPI lists an included router as one entry without a path: its routes are
    # taken from the routers themselves.
    route_paths = frozenset(
        route.path
        for route in [*app.routes, *(r for router in routers for r in router.routes)]
        if isinstance(getattr(route, "path", None), str)
    )
    app.add_middleware(
        ApiKeyAndMetricsMiddleware,
        api_key=settings.api_key,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        route_paths=route_paths,
    )
    return app


def json_dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
