"""The pretrain step: self-supervised pretraining of the encoder (one node, or a TrainJob)."""
