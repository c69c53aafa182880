"""Credits: Generate reserves its cost before work starts, keeps the hold alive while it runs, commits it when
the stream ends successfully and releases it on any failure (model error, client cancellation, deadline,
server shutdown). A server killed mid-request stops extending its holds, so they expire after the hold TTL.

Idempotency: a retry carrying the same `x-idempotency-key` metadata (or the same `request_id`) and the same
request is charged once. While the first attempt runs the retry gets ABORTED; after it succeeded, the retry
gets the same responses again from this server's result cache, or FAILED_PRECONDITION when they are no
longer cached (never a second charge); the same key with a different request is INVALID_ARGUMENT.

Every Kiln response's metadata carries `x-credits-remaining` and `x-credits-reset` (Unix time of the next UTC
midnight); Generate also sends them, with `x-credits-cost`, as initial metadata before its first message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.accounts.accounts import Account, Accounts
from runtime.accounts.ledger import (
    ConcurrencyLimited,
    CreditsExhausted,
    Hold,
    IdempotencyDone,
    IdempotencyInProgress,
    IdempotencyMismatch,
    next_reset,
)
from runtime.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, ResourceExhausted
from runtime.server.context import ACCOUNT, COST, RESPONSE_METADATA
from runtime.server.interceptors.base import KILN_PREFIX, Streaming, Unary, text_metadata, wrap_handler
from runtime.server.pricing import Resolved
from runtime.server.tracing import check_span

log = logging.getLogger("kiln.quota")
GENERATE = KILN_PREFIX + "Generate"
CONCURRENCY_RETRY_S = 1.0
"""RetryInfo for CONCURRENCY_LIMITED: when a running request ends is not known in advance."""


def request_hash(request: pb.GenerateRequest) -> str:
    """What makes two requests 'the same' for idempotency: every field but request_id."""
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class ResultCache:
    """Responses of finished idempotent requests, least recently used dropped first, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0

    def put(self, key: tuple[str, str], responses: list[Any]) -> None:
        size = sum(r.ByteSize() for r in responses)
        if size > self.max_bytes:
            return
        self._items[key] = (responses, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped

    def get(self, key: tuple[str, str]) -> list[Any] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]


class QuotaInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, accounts: Accounts, resolve: Callable[[Any], Resolved | None]):
        self.accounts = accounts
        self.resolve = resolve
        self.cache = ResultCache(accounts.config.result_cache_bytes)

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        method = details.method
        if not method.startswith(KILN_PREFIX):
            return handler
        metadata = text_metadata(details)
        if method != GENERATE:
            return wrap_handler(handler, self._reporting_unary, self._reporting_streaming)

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                async for response in self._generate(behaviour, request, context, metadata):
                    yield response

            return run

        return wrap_handler(handler, self._reporting_unary, streaming)

    # every other Kiln method: report the balance -----------------------------------------------------------------
    async def _report(self, account: Account) -> None:
        now = self.accounts.now()
        bal = await self.accounts.ledger.balance(account.key_id, account.tier.daily_credits, now)
        _set_metadata(remaining=bal.remaining, reset=bal.reset)

    def _reporting_unary(self, behaviour: Unary) -> Unary:
        async def run(request, context):  # type: ignore[no-untyped-def]
            out = await behaviour(request, context)
            account = ACCOUNT.get()
            if account is not None:
                await self._report(account)  # after the call: GrantCredits changes it
            return out

        return run

    def _reporting_streaming(self, behaviour: Streaming) -> Streaming:
        async def run(request, context):  # type: ignore[no-untyped-def]
            async for response in behaviour(request, context):
                yield response
            account = ACCOUNT.get()
            if account is not None:
                await self._report(account)

        return run

    # Generate -----------------------------------------------------------------------------------------------------
    async def _generate(self, behaviour: Streaming, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        metadata: dict[str, str]):  # type: ignore[no-untyped-def]
        account = ACCOUNT.get()
        assert account is not None, "the auth interceptor runs first"
        resolved = self.resolve(request)
        if resolved is None:  # unknown model: the servicer answers NOT_FOUND before any work
            async for response in behaviour(request, context):
                yield response
            return
        ledger, ttl = self.accounts.ledger, self.accounts.config.hold_ttl_s
        idem = metadata.get("x-idempotency-key", "") or request.request_id
        now = self.accounts.now()
        cached = None
        with check_span("kiln.quota"):
            try:
                hold = await ledger.reserve(account.key_id, resolved.cost, account.tier.daily_credits,
                                            account.tier.max_concurrent, now, ttl, idem,
                                            request_hash(request) if idem else "")
            except CreditsExhausted as e:
                _set_metadata(remaining=e.remaining, reset=next_reset(now))
                raise ResourceExhausted(str(e), "CREDITS_EXHAUSTED", f"key:{account.key_id}/daily_credits",
                                        next_reset(now) - now, cost=str(e.cost), remaining=str(e.remaining)) from None
            except ConcurrencyLimited as e:
                raise ResourceExhausted(str(e), "CONCURRENCY_LIMITED", f"key:{account.key_id}/max_concurrent",
                                        CONCURRENCY_RETRY_S, limit=str(e.limit)) from None
            except IdempotencyInProgress as e:
                raise Aborted(str(e)) from None
            except IdempotencyMismatch as e:
                raise InvalidArgument([FieldViolation("x-idempotency-key", str(e))]) from None
            except IdempotencyDone as e:
                cached = self.cache.get((account.key_id, idem))
                if cached is None:
                    raise FailedPrecondition(
                        f"{e}; its result is no longer cached on this server, and it is not run or charged again: "
                        "send a new idempotency key to generate again", "IDEMPOTENT_RESULT_GONE") from None
        if cached is not None:  # a retry of a finished request: its responses again, not charged
            await self._report(account)
            for response in cached:
                yield response
            return

        COST.set(resolved.cost)
        _set_metadata(remaining=hold.remaining, reset=next_reset(now))
        heartbeat = asyncio.create_task(self._keep_alive(hold))
        responses: list[Any] = []
        succeeded = False
        try:
            await context.send_initial_metadata((("x-credits-cost", str(resolved.cost)),
                                                 *(RESPONSE_METADATA.get() or {}).items()))
            async for response in behaviour(request, context):
                if idem:
                    responses.append(response)
                yield response
            succeeded = True
        finally:
            heartbeat.cancel()
            # settle even while this task is being cancelled (client gone, deadline): shielded, and awaited
            settle = asyncio.ensure_future(self._settle(hold, succeeded))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(settle)
        if idem:
            self.cache.put((account.key_id, idem), responses)

    async def _settle(self, hold: Hold, succeeded: bool) -> None:
        ledger = self.accounts.ledger
        if succeeded:
            if not await ledger.commit(hold.hold_id, self.accounts.now()):
                log.warning("hold %s of key %s expired before its request finished: not charged", hold.hold_id,
                            hold.key_id)
        elif await ledger.release(hold.hold_id):
            _set_metadata(remaining=hold.remaining + hold.cost)

    async def _keep_alive(self, hold: Hold) -> None:
        ttl = self.accounts.config.hold_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            if not await self.accounts.ledger.extend(hold.hold_id, self.accounts.now(), ttl):
                log.warning("hold %s of key %s could not be extended", hold.hold_id, hold.key_id)
                return


def _set_metadata(remaining: int | None = None, reset: float | None = None) -> None:
    out = RESPONSE_METADATA.get()
    if out is None:
        return
    if remaining is not None:
        out["x-credits-remaining"] = str(remaining)
    if reset is not None:
        out["x-credits-reset"] = str(int(reset))
