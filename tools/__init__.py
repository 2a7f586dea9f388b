"""Tools beside the product: the local runner, the demo and the quality harness (make up, demo, eval)."""
