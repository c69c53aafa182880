"""A Generate request's size as the server will run it (the model's defaults filled in) and its cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.accounts.cost import request_cost
from runtime.images import header_size
from runtime.pool.card import BundleCard
from runtime.validate import denoising_steps, request_strength


@dataclass(frozen=True)
class Resolved:
    model: str
    """The model's own name (a request may name NAME@VERSION or an alias)."""
    width: int
    height: int
    steps: int
    """Denoising steps the request runs: `steps`, or int(steps * strength) from an init image."""
    images: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def cost(self) -> int:
        return request_cost(self.width, self.height, self.steps, self.images)


def resolve(card: BundleCard | None, request: pb.GenerateRequest) -> Resolved | None:
    """`card`: the bundle version the request's model names (None when the model is not served here: the servicer
    answers NOT_FOUND, nothing is charged). A model that is not loaded is priced from its manifest alone.

    Runs before validation, on the raw request: an init image's size comes from its header (the output's
    size when width/height are unset), and out-of-range values resolve to something chargeable (validation
    refuses them afterwards)."""
    if card is None:
        return None
    d = card.manifest.defaults
    width, height = request.width or int(d["width"]), request.height or int(d["height"])
    if request.init_image and not request.width and not request.height and (size := header_size(request.init_image)):
        width, height = max(size[0] // 8 * 8, 8), max(size[1] // 8 * 8, 8)
    steps = request.steps or int(d["steps"])
    if request.init_image:
        strength = request_strength(request)
        if math.isfinite(strength) and 0.0 < strength <= 1.0:
            steps = max(denoising_steps(steps, strength), 1)
    return Resolved(card.name, width, height, steps, request.num_images or 1)
