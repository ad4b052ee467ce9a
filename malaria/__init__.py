"""Malaria blood-smear cell classifier: data, training, registry and serving helpers."""
