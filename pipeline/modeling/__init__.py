"""Networks, the training recipe (optimiser, losses, samplers, schedules, augmentation, weight average), checkpoints."""
