"""The GPU decode path: weights on the device, the paged KV cache, the decode step and its CUDA graphs."""
