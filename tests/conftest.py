"""Shared fixtures: environment that keeps Ray and MLflow on this machine."""

import os

# Keep a local Ray head on the loopback interface, and MLflow servers light.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
