"""Kiln's HTTP gateway: AUTOMATIC1111's `/sdapi/v1` API, OpenAI's Images API, Kiln's own JSON/SSE surface and a
web page, all as a client of the Kiln gRPC contract (`proto/`). It holds no model and imports no runtime module:
validation, quotas and generation stay in the gRPC server, so the gateway scales and deploys apart from it."""
