"""The diffusion stage's library: cache keys (keys.py), loading or training the denoiser and the
real class means (load.py), and the joint sampler with its decoding (sampling.py)."""
