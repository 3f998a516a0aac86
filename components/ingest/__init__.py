"""The ingest step: load, validate, split and describe the data."""
