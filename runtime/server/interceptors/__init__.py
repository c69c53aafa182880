"""Server interceptors, one concern each, composed in grpc.aio.server(interceptors=[...])."""

from runtime.server.interceptors.base import wrap_handler
from runtime.server.interceptors.errors import ErrorInterceptor

__all__ = ["ErrorInterceptor", "wrap_handler"]
