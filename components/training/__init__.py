"""Training: the one loop, its loss, sampler and checkpoints, replay and distillation, the continual step, what a retrain learns."""
