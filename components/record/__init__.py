"""The record step: the run's ``trained`` and ``gated`` records in the release ledger (components.core.ledger)."""
