"""The model: hyper-parameters and presets (config), RoPE (rope), attention kernels and masks (attention), the NNX
transformer and its KV cache (transformer), per-token log-likelihoods (logprobs) and the logical-axis sharding
rules (sharding).

Nothing here imports anything above it in the package. `config` and `rope` are plain Python / NumPy, so the
Hugging Face conversion (which runs without JAX) shares their rules.
"""
