"""Runtime LoRA updates, as vLLM's: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Served only with `tulu serve --allow-runtime-lora-updating` (vLLM asks for
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): whoever can call them can make the server read any
adapter directory it can see. The request bodies and the plain-text answers are vLLM's, so
its clients and scripts work unchanged. A loaded adapter is at once a `model` of the OpenAI
API, an `adapter_id` of the TGI API and an entry of /v1/models.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from tulu.engine.lora import UnknownLoraAdapter
from tulu.server.app import error_response
from tulu.server.service import GenerationService

router = APIRouter()


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_path: str
    # vLLM's: true replaces an adapter loaded under the name, which is refused here.
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_int_id: int | None = None  # vLLM's, which also unloads by lora_name alone


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> Response:
    """Read the adapter (off the engine thread) and add it between two engine steps."""
    service: GenerationService = request.app.state.service
    name = body.lora_name
    if name == service.settings.served_model_name:
        return error_response(
            request.url.path,
            400,
            f"{name!r} is the base model's served name; give the adapter another name",
            "invalid_request_error",
            "lora_name",
        )
    if body.load_inplace and name in service.lora_adapters:
        return error_response(
            request.url.path,
            400,
            f"load_inplace: replacing a loaded adapter is not supported; unload {name!r} first",
            "invalid_request_error",
            "load_inplace",
        )
    await service.llm.load_lora(name, body.lora_path)  # a TuluError answers 400
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> Response:
    """Remove the adapter for new requests; those running with it finish with it."""
    service: GenerationService = request.app.state.service
    name = body.lora_name
    if name not in service.lora_adapters:
        return _not_loaded(request, name, service)
    try:
        await service.llm.unload_lora(name)
    except UnknownLoraAdapter:  # another unload of it got to the engine first
        return _not_loaded(request, name, service)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _not_loaded(request: Request, name: str, service: GenerationService) -> Response:
    loaded = ", ".join(map(repr, service.lora_adapters)) or "none"
    return error_response(
        request.url.path,
        404,
        f"no LoRA adapter named {name!r} is loaded (loaded: {loaded})",
        "not_found_error",
        "lora_name",
    )
