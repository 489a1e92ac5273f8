"""The Flower layer: ClientApp, ServerApp, strategies, records (the only package importing flwr)."""
