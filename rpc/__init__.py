"""Shared gRPC plumbing: tensor packing, TLS/token security, channels with retries."""
