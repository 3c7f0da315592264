"""`streamer serve`: the HTTP API over `scoring.OnlineScorer` and the changelog replica.

Routes: `POST /v1/score` (one transaction), `POST /v1/score/batch` (up to
`STREAMER_HTTP_MAX_BATCH`), `/openapi.json`, `/livez`, `/readyz`, `/metrics`. FastAPI writes the
OpenAPI document from the pydantic models below; the bodies are read and checked here rather than
by FastAPI, so that a body is refused by its size before it is parsed and a bad transaction gets
the stream's dead-letter words (FastAPI's own validation would word it differently).

Scoring runs on the event loop: the work is CPU-bound and holds the GIL, so threads would add
hand-offs, not throughput. Requests that wait at the same time are scored together in one
pipeline call (`scoring.Coalescer`), since the model's cost is mostly per call; more throughput
comes from more worker processes (`--workers`), each with its own model and replica.

A response never carries a stack trace: an unexpected failure is logged, and answered 500 with a
line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final, Literal, Protocol

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from streamer import __version__
from streamer.events import Verdict
from streamer.model.slot import ModelSlot
from streamer.serve.metrics import MetricsMiddleware, ServeMetrics
from streamer.serve.replica import ReplicaStatus
from streamer.serve.scoring import (
    CardSource,
    Coalescer,
    ItemResult,
    OnlineScorer,
    OverloadedError,
)

log = structlog.get_logger(__name__)

RELOAD_TURN_SECONDS: Final = 0.5
"""How often the server looks after its model slot (which looks at the files every 2 s)."""
ITEM_BODY_BYTES: Final = 8 * 1024
"""Largest JSON body of one transaction; a batch may take this much per transaction.

A valid transaction is well under 2 KiB however its strings are escaped: its ids are at most 128
characters and its other strings codes.
"""
_BEARER: Final = HTTPBearer(auto_error=False, description="`STREAMER_HTTP_TOKEN`, when it is set.")
ROUTES: Final = ("/v1/score", "/v1/score/batch", "/openapi.json", "/livez", "/readyz", "/metrics")


class Replica(CardSource, Protocol):
    """What the server needs of its card histories (`replica.CardReplica`)."""

    @property
    def alive(self) -> bool: ...

    def status(self) -> ReplicaStatus: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...


class ApiError(Exception):
    """A refusal, answered as `{"error": {...}}` with this status."""

    def __init__(
        self, status: int, stage: str, reason: str, fields: Sequence[str] = (), **headers: str
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.body = {"error": {"stage": stage, "reason": reason, "fields": list(fields)}}
        self.headers = headers


# -- the OpenAPI document's models -------------------------------------------------------------


class TransactionIn(BaseModel):
    """A card transaction: the fields of `schemas/transaction.avsc`."""

    transaction_id: str
    event_time: int | str = Field(
        description="Epoch milliseconds (UTC), or an RFC 3339 time with an offset "
        "(`2026-11-30T12:00:00.250Z`)."
    )
    card_id: str
    merchant_id: str
    merchant_category: str
    amount: float = Field(ge=0)
    currency: str = Field(description="ISO 4217 alphabetic code.")
    country: str = Field(description="ISO 3166-1 alpha-2 code of where it happened.")
    channel: Literal["pos", "ecommerce", "atm", "moto"]
    card_present: bool
    card_country: str | None = None
    card_avg_amount: float | None = None


class BatchIn(BaseModel):
    transactions: list[TransactionIn]


class ErrorDetail(BaseModel):
    stage: str = Field(
        description="`decode`, `validate` or `score` (the stream's dead-letter stage) for a "
        "transaction; `request` or `server` for the request itself."
    )
    reason: str = Field(description="For a transaction: the stream's dead-letter reason.")
    fields: list[str] = Field(description="The transaction's fields the reason names.")


class ErrorOut(BaseModel):
    error: ErrorDetail


class HistoryOut(BaseModel):
    """Which card history the verdict's features came from."""

    found: bool = Field(description="False: no history of the card (scored as its first).")
    partition: int | None
    changelog_offset: int | None = Field(description="Changelog record the history came from.")
    updated_at: int | None = Field(description="When the stream wrote that history (epoch ms).")


class ReplicaOut(BaseModel):
    """How far the server's card histories are behind the stream's."""

    caught_up: bool
    lag_records: int
    seconds_since_caught_up: float | None


class ScoreOut(BaseModel):
    verdict: Verdict
    history: HistoryOut
    replica: ReplicaOut


class BatchItemOut(BaseModel):
    verdict: Verdict | None = None
    history: HistoryOut | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut] = Field(description="One per transaction, in order.")
    scored: int
    refused: int
    replica: ReplicaOut


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


_REFUSALS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorOut, "description": "No or a wrong bearer token; nothing scored."},
    413: {"model": ErrorOut, "description": "Body too large; refused unread."},
    422: {"model": ErrorOut, "description": "Not a valid transaction (the dead-letter reason)."},
    503: {
        "model": ErrorOut,
        "description": "Card histories not caught up yet, or too many transactions waiting.",
    },
}


# -- the application -----------------------------------------------------------------------------


async def _reload(slot: ModelSlot, scorer: OnlineScorer, metrics: ServeMetrics) -> None:
    """Look after the model slot each `RELOAD_TURN_SECONDS`; swap a new scorer in when ready.

    As in `streamer run` (`model.slot`): a new pair renamed into place, or SIGHUP, is loaded,
    verified and warmed in a thread, then swapped in between two model calls (the pipeline reads
    its scorer once per call), so a batch request is scored by one model throughout.
    """
    while True:
        await asyncio.sleep(RELOAD_TURN_SECONDS)
        refused = slot.refused
        slot.maintain()
        if slot.refused != refused:
            metrics.model_reload_failures.inc(slot.refused - refused)
        if slot.ready:
            scorer.pipeline.scorer = slot.swap()
            metrics.model_reloads.inc()


def create_app(
    scorer: OnlineScorer,
    replica: Replica,
    *,
    token: str | None,
    max_batch: int,
    metrics: ServeMetrics | None = None,
    slot: ModelSlot | None = None,
) -> FastAPI:
    """The server; the lifespan starts and stops `replica`, and looks after `slot` (reload)."""
    metrics = metrics or ServeMetrics(replica.status)
    token_bytes = None if token is None else token.encode()

    coalescer: Coalescer | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal coalescer
        coalescer = Coalescer(scorer, max_batch)
        tasks = [asyncio.create_task(coalescer.run(), name="scoring")]
        if slot is not None:
            tasks.append(asyncio.create_task(_reload(slot, scorer, metrics), name="reload"))
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # SIGHUP checks the model files at once, as for `streamer run` (one process;
                # with workers, uvicorn's parent answers SIGHUP by restarting them).
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, slot.request_check)
        replica.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            replica.stop()
            if slot is not None:
                slot.close()

    async def score_items(items: list[Any]) -> list[ItemResult]:
        assert coalescer is not None, "the lifespan starts it before any request"
        try:
            return await coalescer.score(items)
        except OverloadedError as exc:
            metrics.overloaded.inc()
            raise ApiError(
                503, "request", f"overloaded, retry shortly: {exc}", **{"Retry-After": "1"}
            ) from None

    app = FastAPI(
        title="streamer",
        version=__version__,
        summary="Card transaction fraud scores, from the stream's model and card histories.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if token_bytes is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, token_bytes):
            raise ApiError(
                401,
                "request",
                "a valid bearer token is required (Authorization: Bearer <token>)",
                **{"WWW-Authenticate": "Bearer"},
            )

    async def read_json(request: Request, limit: int) -> Any:
        """The body as JSON, refused unread (413) past `limit` bytes, 400 if not JSON."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, "request", f"body of {declared} bytes exceeds the limit of {limit} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, "request", f"body of over {limit} bytes exceeds the limit of {limit} bytes"
                )
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "request", f"body is not JSON: {exc}") from None

    def replica_ready() -> ReplicaStatus:
        status = replica.status()
        if not status.caught_up_once or status.error is not None:
            raise ApiError(
                503,
                "request",
                "card histories are not caught up with the stream yet; retry shortly",
                **{"Retry-After": "1"},
            )
        return status

    def count(results: list[ItemResult]) -> None:
        for result in results:
            if result.error is not None:
                metrics.refused.labels(result.error.stage).inc()
            else:
                metrics.scored.inc()
                metrics.flagged.inc(bool(result.verdict and result.verdict["is_fraud"]))

    @app.post(
        "/v1/score",
        response_model=ScoreOut,
        responses=_REFUSALS,
        openapi_extra=_body_schema(TransactionIn),
        dependencies=[Depends(authorize)],
        summary="Score one transaction",
    )
    async def score(request: Request) -> JSONResponse:
        """The transaction's verdict, from the stream's model and the card's latest history.

        The card history is not changed: the transaction is scored as the stream would score it
        next, and counts in the history once the stream has scored it.
        """
        item = await read_json(request, ITEM_BODY_BYTES)
        status = replica_ready()
        [result] = await score_items([item])
        count([result])
        if result.error is not None:
            return JSONResponse({"error": result.error.as_json()}, status_code=422)
        return JSONResponse({**result.as_json(), "replica": _replica_json(status)})

    @app.post(
        "/v1/score/batch",
        response_model=BatchOut,
        responses=_REFUSALS,
        openapi_extra=_body_schema(BatchIn),
        dependencies=[Depends(authorize)],
        summary="Score transactions in order",
    )
    async def score_batch(request: Request) -> JSONResponse:
        """A verdict or an error per transaction, in order; a card's transactions in the batch
        are scored one after another, each seeing the ones before it."""
        body = await read_json(request, ITEM_BODY_BYTES * max_batch + 64)
        if not isinstance(body, dict) or not isinstance(body.get("transactions"), list):
            raise ApiError(
                422,
                "request",
                'transactions: expected {"transactions": [...]} with a list of transactions',
                ["transactions"],
            )
        items = body["transactions"]
        extra = sorted(body.keys() - {"transactions"})
        if extra:
            raise ApiError(422, "request", f"unknown fields {extra}", extra)
        if len(items) > max_batch:
            raise ApiError(
                422,
                "request",
                f"transactions: at most {max_batch} in one batch (got {len(items)}); "
                "STREAMER_HTTP_MAX_BATCH sets the limit",
                ["transactions"],
            )
        status = replica_ready()
        results = await score_items(items)
        count(results)
        refused = sum(result.error is not None for result in results)
        return JSONResponse(
            {
                "results": [result.as_json() for result in results],
                "scored": len(results) - refused,
                "refused": refused,
                "replica": _replica_json(status),
            }
        )

    @app.get("/livez", summary="The process serves, and its changelog reader runs")
    async def livez() -> JSONResponse:
        if not replica.alive:
            status = replica.status()
            return JSONResponse(
                {"status": "failing", "reason": f"changelog reader stopped: {status.error}"},
                status_code=503,
            )
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Card histories caught up with the stream at least once")
    async def readyz() -> JSONResponse:
        status = replica.status()
        ready = status.caught_up_once and status.error is None
        body = {
            "status": "ready" if ready else "not ready",
            "model_name": scorer.pipeline.scorer.name,
            "model_version": scorer.pipeline.scorer.version,
            "changelog_topic": status.topic,
            "partitions": status.partitions,
            "cards": status.cards,
            **_replica_json(status),
        }
        if status.error is not None:
            body["reason"] = f"changelog reader stopped: {status.error}"
        elif not ready:
            body["reason"] = "catching up with the changelog"
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def refused(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "request failed",
            path=request.url.path,
            error=repr(exc),
            error_class=type(exc).__name__,
            exc_info=exc,
        )
        reason = "internal error; see the server log"
        return JSONResponse(
            {"error": {"stage": "server", "reason": reason, "fields": []}}, status_code=500
        )

    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)
    return app


def _replica_json(status: ReplicaStatus) -> dict[str, Any]:
    since = status.seconds_since_caught_up
    return {
        "caught_up": status.caught_up,
        "lag_records": status.lag_records,
        "seconds_since_caught_up": None if since is None else round(since, 3),
    }
