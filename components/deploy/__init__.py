"""The deploy step: serve the released model locally or roll it out on Kubernetes."""
