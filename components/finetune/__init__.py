"""The finetune step: the classifier on few labels, optionally robust or with DP-SGD."""
