"""Training: runtime and DDP, augmentations, objectives, the loops, DP-SGD, robust training, the multi-node TrainJob."""
