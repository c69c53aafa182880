"""AUTOMATIC1111's `/sdapi/v1` API, the parts clients call, over Kiln's gRPC contract."""

from gateway.a1111.routes import router

__all__ = ["router"]
