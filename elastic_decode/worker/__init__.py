"""What every rank runs: the model runner (it owns the KV cache and the CUDA graphs), one decode step, the
resident device batch, the graphs, the kernel backend, and the tensor-parallel worker's loop."""
