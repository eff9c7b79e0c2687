"""scaling: train GPT-2 from one CPU to a multi-node GPU cluster, PyTorch only."""
