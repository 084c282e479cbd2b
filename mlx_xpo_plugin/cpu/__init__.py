"""CPU speed under MLX on Linux: a fast BLAS loaded ahead of MLX's bundled one (fast_blas, with
blas_shim for prefixed routine names) and the few-row product kernel decoding runs on (skinny)."""
