"""Prefect 3 flows around the malaria package: evaluation, drift, batch prediction, training pipeline.

They run off the serving path: they read the registry, the data and the service's prediction log.
"""
