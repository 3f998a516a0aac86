"""The shared library of the steps: data, models, features, storage, checkpoints, gates, cost, names. Imports no step."""
