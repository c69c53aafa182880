"""gRPC serving: servicer, interceptors and the grpc.aio server lifecycle."""
