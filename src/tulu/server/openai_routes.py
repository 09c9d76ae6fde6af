"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

router = APIRouter()
CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request):
    service = request.app.state.service
    name = service.settings.served_model_name
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": CREATED, "owned_by": "tulu",
                  "max_model_len": service.max_model_len}],
    }
