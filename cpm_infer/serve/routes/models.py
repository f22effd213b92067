"""OpenAI's ``/v1/models``: the one model this server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cpm_infer.serve.routes import Served


def add_routes(router: APIRouter, served: Served) -> None:
    def card() -> dict[str, Any]:
        return {
            "id": served.model_name,
            "object": "model",
            "created": served.created,
            "owned_by": "cpm-infer",
            "context_length": served.n_positions,
        }

    @router.get("/v1/models", responses=served.errors.only(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @router.get("/v1/models/{model}", responses=served.errors.only(401, 404))
    async def model(model: str) -> dict[str, Any]:
        served.check_model(model)
        return card()
