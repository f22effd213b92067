"""``/zuowen``: the essay route of the seed service (yangjianxin1/CPM ``http_service.py``), its contract kept:
``title`` and ``context`` in, ``{"title", "content"}`` out, where ``content`` is the given context continued."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from cpm_infer.serve import schemas
from cpm_infer.serve.routes import Served


def add_routes(router: APIRouter, served: Served) -> None:
    tokenizer = served.tokenizer

    async def essay(request: Request, title: str, context: str, max_len: int, seed: int | None) -> dict[str, str]:
        title = schemas.clean_field(title, "title")
        context = schemas.clean_field(context, "context")

        def encode() -> tuple[list[int], int]:
            ids = schemas.essay_ids(tokenizer, title, context, min(served.n_positions, served.max_prompt + 1))
            return ids, len(tokenizer.encode(title)) + 1  # where the context starts (after <sep>)

        ids, context_start = await run_in_threadpool(encode)
        config = schemas.essay_config(max_len, len(ids), seed, served.settings)
        results = await served.results(served.scheduler.submit([ids], config), request)
        # As the seed service: the context the client gave, continued (decoded together, as the seed did).
        content = tokenizer.decode(ids[context_start:] + results[0].token_ids)
        return {"title": title, "content": content}

    @router.get("/zuowen", responses=served.errors.only(400, 401, 503, 504, 500))
    async def essay_get(
        request: Request,
        title: str,
        context: str = "",
        max_len: int = Query(schemas.ESSAY_MAX_LEN, ge=1, le=schemas.ESSAY_MAX_INT),
        seed: int | None = Query(None, ge=0, le=schemas.ESSAY_MAX_INT),
    ) -> dict[str, str]:
        return await essay(request, title, context, max_len, seed)

    @router.post("/zuowen", responses=served.errors.only(400, 401, 413, 503, 504, 500))
    async def essay_post(body: schemas.EssayRequest, request: Request) -> dict[str, str]:
        return await essay(request, body.title, body.context, body.max_len, body.seed)
