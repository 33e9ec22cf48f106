"""Training services the stages share: the training loop and its helpers (loop.py), the teacher,
the students, the random-real baseline, the denoiser's training, recover's pixel optimisation and
the real class statistics."""
