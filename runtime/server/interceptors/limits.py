"""Tier limits on Generate: the models a tier may use (PERMISSION_DENIED) and its largest steps, pixels and
images (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime.errors import FieldViolation, InvalidArgument, PermissionDenied
from runtime.server.context import ACCOUNT
from runtime.server.interceptors.base import KILN_PREFIX, CheckInterceptor
from runtime.server.pricing import Resolved


class TierLimitsInterceptor(CheckInterceptor):
    def __init__(self, resolve: Callable[[Any], Resolved | None]):
        self.resolve = resolve

    async def check(self, method: str, request: Any, metadata: dict[str, str]) -> None:
        if method != KILN_PREFIX + "Generate":
            return
        account = ACCOUNT.get()
        assert account is not None, "the auth interceptor runs first"
        tier = account.tier
        r = self.resolve(request)
        name = r.model if r is not None else request.model  # NAME@VERSION and aliases: the model's own name
        if request.model and not (tier.allows_model(name) or tier.allows_model(request.model)):
            raise PermissionDenied(f"model {request.model!r} is not in tier {tier.name!r}; it allows: "
                                   f"{', '.join(tier.models)}", "MODEL_NOT_IN_TIER", tier=tier.name,
                                   model=request.model)
        if r is None:
            return  # unknown model: the servicer says NOT_FOUND
        bad = []
        if r.steps > tier.max_steps:
            what = f"steps={r.steps}" if not request.init_image else f"int(steps x strength) = {r.steps} denoising steps"
            bad.append(FieldViolation("steps", f"{what} is above tier {tier.name!r}'s max_steps={tier.max_steps}"))
        if r.pixels > tier.max_pixels:
            bad.append(FieldViolation("width", f"width x height = {r.width}x{r.height} = {r.pixels} pixels is above "
                                               f"tier {tier.name!r}'s max_pixels={tier.max_pixels}"))
        if r.images > tier.max_images:
            bad.append(FieldViolation("num_images", f"num_images={r.images} is above tier {tier.name!r}'s "
                                                    f"max_images={tier.max_images}"))
        if bad:
            raise InvalidArgument(bad)
