"""The plumbing both gRPC services stand on: serving, admission, auth, metrics, errors, health probe."""
