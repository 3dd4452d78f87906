"""What leaves the pipeline for people: figures, provenance, the report's content and templates, and
the MLflow adapter (the only module that imports mlflow)."""
