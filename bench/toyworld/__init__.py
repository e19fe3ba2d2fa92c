"""The toy world: a tiny SD1.x-shaped text-to-image model, its data, a scorer and an erasure harness."""
