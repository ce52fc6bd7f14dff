"""`python -m worker [celery worker options]`: a worker on the settings from the environment."""

import sys

from worker.main import start_worker

start_worker(extra_args=sys.argv[1:])
