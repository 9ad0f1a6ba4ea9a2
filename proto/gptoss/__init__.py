"""Generated gRPC stubs of the public API (see proto/gptoss/v1/gptoss.proto)."""
