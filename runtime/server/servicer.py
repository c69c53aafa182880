"""The kiln.v1.Kiln servicer: turns RPCs into engine jobs and engine events into responses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

import grpc

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime import engine as ev
from runtime.accounts.accounts import Accounts
from runtime.accounts.ledger import Balance
from runtime.accounts.tiers import Tier
from runtime.adapters import Adapter
from runtime.engine import Engine
from runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unavailable
from runtime.model import LoadedModel
from runtime.pipeline import Generation, Pipeline
from runtime.pool.card import AdapterListing, BundleCard
from runtime.pool.memory import rss
from runtime.pool.pool import ModelLoadFailed, ModelPool
from runtime.samplers import SAMPLERS
from runtime.server.context import ACCOUNT, COST, REQUEST_ID
from runtime.validate import MAX_PROMPT_CHARS, validate

LOADING_EVERY_S = 1.0
"""While a request waits for its model to load, a `loading` progress event this often."""


class KilnServicer(pb_grpc.KilnServicer):
    def __init__(self, pool: ModelPool, engine: Engine, accounts: Accounts | None = None):
        self.pool = pool
        self.engine = engine
        self.accounts = accounts
        self.accepting = True

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        pool = self.pool
        infos = []
        for name in pool.names:
            with contextlib.suppress(NotFound):  # removed from the store since `names` was read
                infos.append(self._info(name))
        return pb.ListModelsResponse(models=infos,
                                     memory_budget_bytes=pool.budget or 0, memory_used_bytes=pool.used_bytes,
                                     process_resident_bytes=rss())

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        card = self.pool.resolve(request.model)
        await self.pool.load(card)
        return self._info(card.name)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        card = self.pool.resolve(request.model)
        await self.pool.unload(card)
        return self._info(card.name)

    def _info(self, name: str) -> pb.ModelInfo:
        pool = self.pool
        card = pool.resolve(name)
        slots = sorted((s for s in pool.slots.values() if s.card.name == name and s.model is not None),
                       key=lambda s: s.key)
        current = pool.slots.get(card.key)
        info = model_info(card, pool.resident(card))
        info.loaded = current is not None and current.model is not None
        info.memory_bytes = sum(s.bytes for s in slots)
        info.last_used_unix = max((s.last_used for s in slots), default=current.last_used if current else 0.0)
        info.pinned = current is not None and pool.pinned(current)
        info.versions.extend(pool.catalog.versions(name))
        info.loaded_versions.extend(s.card.version for s in slots)
        info.aliases.update(pool.catalog.aliases_of(name))
        info.engine = current.engine if current is not None else pool.engine_of(card)
        info.load_seconds = current.load_s if current is not None else 0.0
        return info

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.perf_counter()
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another replica")
        if not request.model:
            raise InvalidArgument([FieldViolation("model", f"model is required; available: {', '.join(self.pool.names)}")])
        card = self.pool.resolve(request.model)
        resident = self.pool.resident(card)
        m = card.manifest
        args = (request, m.defaults, m.limits, REQUEST_ID.get(), "latent_rgb" in m.model, card.schedule,
                "vae_encoder" in m.components)
        check = functools.partial(validate, decoders=tuple(card.decoders),
                                  adapters=resident.adapters if resident else card.adapters,
                                  max_loras=card.max_loras, sdxl=card.sdxl)
        # decoding client images takes a while (up to 4096x4096): off the event loop
        params = await asyncio.to_thread(check, *args) if request.init_image else check(*args)
        self.engine.check_capacity()  # SERVER_BUSY before anything is streamed
        rid = params.request_id
        slot = None
        try:
            waited = time.perf_counter()
            while slot is None:
                leasing = asyncio.ensure_future(self.pool.acquire(card))
                try:
                    while not leasing.done():
                        if resident is None:  # say why nothing happens yet
                            yield pb.GenerateResponse(request_id=rid, progress=pb.Progress(
                                stage="loading", elapsed_s=time.perf_counter() - t0))
                        await asyncio.wait({leasing}, timeout=LOADING_EVERY_S)
                    slot = leasing.result()
                except ModelLoadFailed:
                    retry = self.pool.card_or_none(request.model) if "@" not in request.model else None
                    if retry is None or retry.key == card.key:
                        raise
                    card = retry  # the plain name moved to an older version that may load
                finally:
                    if not leasing.done():
                        leasing.cancel()
                    elif slot is None and not leasing.cancelled() and leasing.exception() is None:
                        self.pool.release(leasing.result())  # cancelled just as it was granted
            model = slot.model
            assert model is not None
            missing = [name for name, _ in params.loras if name not in model.adapters]
            if missing:
                raise NotFound("adapter", missing[0], sorted(model.adapters))
            gen = Generation(params, model, started=t0)
            gen.timings["validate"] = waited - t0
            if resident is None:
                gen.timings["load"] = time.perf_counter() - waited
            async for response in self._run(request, gen, rid):
                yield response
        finally:
            if slot is not None:
                self.pool.release(slot)

    async def _run(self, request: pb.GenerateRequest, gen: Generation, rid: str) -> AsyncIterator[pb.GenerateResponse]:
        params, model = gen.params, gen.model
        truncations = Pipeline(model).tokenize(gen)
        yield pb.GenerateResponse(request_id=rid, started=pb.Started(
            model=model.name, model_version=model.version, width=params.width, height=params.height,
            steps=params.steps, guidance_scale=params.guidance_scale, sampler=params.sampler, seed=params.seed,
            num_images=params.num_images, cost=COST.get(), mode=params.mode,
            strength=params.strength if params.init_image is not None else 0.0,
            denoising_steps=params.denoising_steps,
            truncations=[pb.PromptTruncation(field=t.field, kept_tokens=t.kept_tokens,
                                             dropped_tokens=t.dropped_tokens, dropped_text=t.dropped_text)
                         for t in truncations],
        ))
        job = self.engine.submit(gen)
        try:
            async for event in job.events():
                if isinstance(event, ev.Failed):
                    raise event.error
                if isinstance(event, ev.Progress):
                    if request.omit_progress and not event.preview:
                        continue
                    yield pb.GenerateResponse(request_id=rid, progress=pb.Progress(
                        stage=event.stage, step=event.step, total_steps=event.total_steps, elapsed_s=event.elapsed,
                        preview_png=event.preview))
                elif isinstance(event, ev.Artifact):
                    yield pb.GenerateResponse(request_id=rid, artifact=pb.Artifact(
                        index=event.index, mime="image/png", data=event.png, seed=event.seed,
                        finish_reason=pb.FINISH_REASON_SUCCESS, width=params.width, height=params.height,
                        timings=[pb.StageTiming(stage=k, seconds=v) for k, v in event.timings.items()],
                    ))
        finally:
            job.cancel()  # a no-op when finished; on client cancel or deadline, stops before the next step

    # accounts ---------------------------------------------------------------------------------------------------
    def _accounts(self) -> Accounts:
        if self.accounts is None:
            raise FailedPrecondition("this server runs without accounts (started without --auth-db)", "NO_ACCOUNTS")
        return self.accounts

    async def GetBalance(self, request: pb.GetBalanceRequest, context: grpc.aio.ServicerContext) -> pb.Balance:
        accounts = self._accounts()
        account = ACCOUNT.get()
        assert account is not None, "the auth interceptor runs first"
        b = await accounts.ledger.balance(account.key_id, account.tier.daily_credits, accounts.now())
        return _balance(account.key_id, account.tier, b)

    async def GrantCredits(self, request: pb.GrantCreditsRequest, context: grpc.aio.ServicerContext) -> pb.Balance:
        accounts = self._accounts()
        if request.credits < 1:
            raise InvalidArgument([FieldViolation("credits", f"credits={request.credits} must be at least 1")])
        record = await accounts.ledger.get_key(request.key_id)
        if record is None:
            raise NotFound("key", request.key_id, [])
        tier = accounts.tiers.get(record.tier)
        if tier is None:
            raise FailedPrecondition(f"key {request.key_id}'s tier {record.tier!r} is not in the tiers file",
                                     "UNKNOWN_TIER")
        b = await accounts.ledger.grant(request.key_id, request.credits, tier.daily_credits, accounts.now())
        if b is None:
            raise NotFound("key", request.key_id, [])
        return _balance(request.key_id, tier, b)

    async def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext) -> pb.CreateKeyResponse:
        accounts = self._accounts()
        if request.tier not in accounts.tiers:
            raise InvalidArgument([FieldViolation("tier", f"tier {request.tier!r} is not one of: "
                                                          f"{', '.join(accounts.tiers)}")])
        new = await accounts.create_key(request.tier, request.label)
        return pb.CreateKeyResponse(key_id=new.key_id, api_key=new.token, tier=request.tier)

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext) -> pb.RevokeKeyResponse:
        accounts = self._accounts()
        if not await accounts.ledger.revoke_key(request.key_id, accounts.now()):
            raise NotFound("key", request.key_id, [])
        record = await accounts.ledger.get_key(request.key_id)
        assert record is not None and record.revoked is not None
        return pb.RevokeKeyResponse(revoked_unix=record.revoked)


def _balance(key_id: str, tier: Tier, b: Balance) -> pb.Balance:
    return pb.Balance(key_id=key_id, tier=tier.name, remaining=b.remaining, daily_credits=b.daily,
                      granted=b.granted, spent=b.spent, held=b.held, reset_unix=int(b.reset))


def model_info(card: BundleCard, model: LoadedModel | None = None) -> pb.ModelInfo:
    """A bundle version's listing; its adapters are the loaded model's (those that fit it) once it is loaded."""
    m = card.manifest
    d, lim = m.defaults, m.limits
    adapters: list[Adapter | AdapterListing] = list((model.adapters if model is not None else card.adapters).values())
    return pb.ModelInfo(
        name=m.name, version=m.version, precision=m.precision,
        default_width=d["width"], default_height=d["height"], default_steps=d["steps"],
        default_guidance_scale=d["guidance_scale"], default_sampler=d["sampler"],
        limits=pb.ModelLimits(
            min_size=lim["min_size"], max_size=lim["max_size"], max_steps=lim["max_steps"],
            max_images=lim["max_images"], max_guidance_scale=lim["max_guidance_scale"],
            max_prompt_chars=MAX_PROMPT_CHARS, max_loras=card.max_loras,
        ),
        adapters=[pb.LoraInfo(name=a.name, sha256=a.sha256, scale=1.0, rank=a.rank)
                  for a in sorted(adapters, key=lambda a: a.name)],
        samplers=list(SAMPLERS),
        inpainting_model=card.inpainting,
        embedding_tokens=[e["token"] for e in m.tokenizer.get("embeddings", [])],
        decoders=list(card.decoders),
        fidelity=pb.Fidelity(
            psnr_db=f["psnr"], ssim=f["ssim"], low_fidelity=bool(f.get("low_fidelity")), failures=f.get("failures", []),
        ) if (f := m.fidelity) else None,
        source_family=str(m.source.get("family", "diffusers-folder")),
        architecture=str(m.model.get("architecture", "sd")),
        fused_loras=[pb.LoraInfo(name=str(lo["name"]), sha256=str(lo["sha256"]), scale=float(lo["scale"]),
                                 rank=int(lo["rank"])) for lo in m.source.get("loras", [])],
    )
