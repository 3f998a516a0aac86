"""The robustness step: accuracy under noise, corruptions and attacks, as a gate."""
