"""TGI-compatible routes: /generate, /generate_stream, /info."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tulu import __version__

router = APIRouter()


@router.get("/info")
async def info(request: Request):
    service = request.app.state.service
    return {
        "model_id": service.settings.served_model_name,
        "model_dtype": str(service.llm.engine.dtype).removeprefix("torch."),
        "model_device_type": service.llm.engine.device.type,
        "max_input_tokens": service.max_model_len - 1,
        "max_total_tokens": service.max_model_len,
        "max_concurrent_requests": service.settings.max_num_seqs + service.settings.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": 16,
        "router": "tulu",
        "version": __version__,
    }
