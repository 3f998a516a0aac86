"""The evaluate step: scores, calibration, saliency, the champion comparison and the release gate."""
