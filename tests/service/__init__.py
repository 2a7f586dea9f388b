"""Service tests: real gRPC servers and the gateway in process, on free ports."""
