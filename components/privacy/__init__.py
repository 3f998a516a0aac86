"""The privacy step: membership inference, train/test leakage and the DP budget, as a gate."""
