"""The FastAPI app of test_fastapi_uvicorn.py: route limits on the default storage and a
middleware (also on the default storage) with a per-request quota."""

from __future__ import annotations

from fastapi import Depends, FastAPI

import fineflow as ff
from fineflow.fastapi import RateLimit, install


def create_app() -> FastAPI:
    app = FastAPI()
    install(app)
    app.add_middleware(
        ff.RateLimitMiddleware,
        rules=[ff.Rule("/plan", quota=lambda scope: "3/minute", name="plan")],
    )

    @app.get("/search", dependencies=[Depends(RateLimit("2/minute", name="search"))])
    async def search() -> list[str]:
        return ["x"]

    @app.get("/plan")
    async def plan() -> dict[str, str]:
        return {"plan": "ok"}

    return app
