"""A Generate request's size as the server will run it (the model's defaults filled in) and its cost."""

from __future__ import annotations

from dataclasses import dataclass

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.accounts.cost import request_cost
from runtime.model import LoadedModel


@dataclass(frozen=True)
class Resolved:
    model: str
    width: int
    height: int
    steps: int
    images: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def cost(self) -> int:
        return request_cost(self.width, self.height, self.steps, self.images)


def resolve(models: dict[str, LoadedModel], request: pb.GenerateRequest) -> Resolved | None:
    """None when the model is not served here (the servicer answers NOT_FOUND, nothing is charged)."""
    model = models.get(request.model)
    if model is None:
        return None
    d = model.manifest.defaults
    return Resolved(request.model, request.width or int(d["width"]), request.height or int(d["height"]),
                    request.steps or int(d["steps"]), request.num_images or 1)
