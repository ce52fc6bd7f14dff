"""The Celery worker that runs deletion requests (imports torch only inside the task)."""
