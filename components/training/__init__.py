"""Training: the one loop, its losses and sampler, replay and distillation, what a retrain learns."""
