"""The monitor step: drift of served traffic against the training-time references."""
