"""Test helpers shared by every package: the model conformance suite and tiny offline assets."""
