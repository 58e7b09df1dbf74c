-- Runs once, when the PostgreSQL volume is first initialised: POSTGRES_DB (prefect) exists by
-- then; MLflow's tracking and registry store gets its own database.
CREATE DATABASE mlflow;
