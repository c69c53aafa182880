"""The kiln.v1.Kiln servicer: turns RPCs into engine jobs and engine events into responses."""

from __future__ import annotations

import asyncio
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
from runtime.engine import Engine
from runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unavailable
from runtime.model import LoadedModel
from runtime.pipeline import Generation, Pipeline
from runtime.samplers import SAMPLERS
from runtime.server.context import ACCOUNT, COST, REQUEST_ID
from runtime.validate import MAX_PROMPT_CHARS, validate


class KilnServicer(pb_grpc.KilnServicer):
    def __init__(self, models: dict[str, LoadedModel], engine: Engine, accounts: Accounts | None = None):
        self.models = models
        self.engine = engine
        self.accounts = accounts
        self.accepting = True

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.models.values()])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.perf_counter()
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another replica")
        if not request.model:
            raise InvalidArgument([FieldViolation("model", f"model is required; available: {', '.join(self.models)}")])
        model = self.models.get(request.model)
        if model is None:
            raise NotFound("model", request.model, sorted(self.models))
        m = model.manifest
        args = (request, m.defaults, m.limits, REQUEST_ID.get(), "latent_rgb" in m.model, model.schedule,
                "vae_encoder" in model.sessions)
        check = functools.partial(validate, decoders=tuple(model.decoders), adapters=model.adapters,
                                  max_loras=model.max_loras, sdxl=model.sdxl)
        # decoding client images takes a while (up to 4096x4096): off the event loop
        params = await asyncio.to_thread(check, *args) if request.init_image else check(*args)
        self.engine.check_capacity()  # SERVER_BUSY before anything is streamed
        gen = Generation(params, model, started=t0)
        gen.timings["validate"] = time.perf_counter() - t0
        truncations = Pipeline(model).tokenize(gen)
        rid = params.request_id

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


def model_info(model: LoadedModel) -> pb.ModelInfo:
    m = model.manifest
    d, lim = m.defaults, m.limits
    return pb.ModelInfo(
        name=m.name, version=m.version, precision=m.precision,
        default_width=d["width"], default_height=d["height"], default_steps=d["steps"],
        default_guidance_scale=d["guidance_scale"], default_sampler=d["sampler"],
        limits=pb.ModelLimits(
            min_size=lim["min_size"], max_size=lim["max_size"], max_steps=lim["max_steps"],
            max_images=lim["max_images"], max_guidance_scale=lim["max_guidance_scale"],
            max_prompt_chars=MAX_PROMPT_CHARS, max_loras=model.max_loras,
        ),
        adapters=[pb.LoraInfo(name=a.name, sha256=a.sha256, scale=1.0, rank=a.rank)
                  for a in sorted(model.adapters.values(), key=lambda a: a.name)],
        samplers=list(SAMPLERS),
        inpainting_model=model.inpainting,
        embedding_tokens=model.tokenizer.embedding_tokens,
        decoders=list(model.decoders),
        fidelity=pb.Fidelity(
            psnr_db=f["psnr"], ssim=f["ssim"], low_fidelity=bool(f.get("low_fidelity")), failures=f.get("failures", []),
        ) if (f := m.fidelity) else None,
        source_family=str(m.source.get("family", "diffusers-folder")),
        architecture=str(m.model.get("architecture", "sd")),
        fused_loras=[pb.LoraInfo(name=str(lo["name"]), sha256=str(lo["sha256"]), scale=float(lo["scale"]),
                                 rank=int(lo["rank"])) for lo in m.source.get("loras", [])],
    )
