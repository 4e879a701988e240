"""Triton kernels (CUDA; testable on CPU with TRITON_INTERPRET=1). Import lazily: needs triton."""
