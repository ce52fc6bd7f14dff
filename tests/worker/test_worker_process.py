"""What the worker's parent process (and the API) import."""

from __future__ import annotations

import subprocess
import sys



def test_torch_stays_out_of_the_api_and_the_worker_parent() -> None:
    # CUDA must only ever be initialised in the pool child, and the API never needs torch to start.
    code = (
        "import sys, api.app, worker.celery_app, worker.tasks, worker.main, worker.context, worker.reconciler, uisps.cli\n"
        "api.app.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'core.workflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
