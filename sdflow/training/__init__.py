"""Training: the loop (run in accelerate/torchrun processes), the objective, the lr schedules, validation,
the text encoder as trained, continuation, the latent data loader, speed and memory options."""
