"""The Flower layer: ClientApp, ServerApp, strategies and records (the only package importing flwr)."""
