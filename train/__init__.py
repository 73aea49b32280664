"""Training side of MoLE-Flow: data, backbone, flow, router, continual trainer, metrics."""
