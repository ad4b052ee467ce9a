"""Serve the flows as scheduled deployments: drift daily, evaluation weekly, the rest on demand.

Run `python flows/deploy.py` (or `malaria deploy-flows`) next to a Prefect server
(`prefect server start`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`); it keeps running and
executes the scheduled runs.
"""

from __future__ import annotations

from prefect import serve

from flows.batch_predict import batch_predict_flow
from flows.drift import drift_flow
from flows.evaluate import evaluate_flow
from flows.pipeline import training_pipeline
from flows.smear_report import smear_report_flow


def deployments():
    return [
        drift_flow.to_deployment(name="drift-daily", cron="0 6 * * *", parameters={"hours": 24}),
        evaluate_flow.to_deployment(name="evaluate-weekly", cron="0 7 * * 1"),
        training_pipeline.to_deployment(name="training-pipeline"),
        batch_predict_flow.to_deployment(name="batch-predict"),
        smear_report_flow.to_deployment(name="smear-report"),
    ]


if __name__ == "__main__":
    serve(*deployments())
