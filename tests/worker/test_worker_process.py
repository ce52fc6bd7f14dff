"""The worker process's configuration, and what its parent process imports."""

from __future__ import annotations

import subprocess
import sys

from core.settings import Settings
from worker.celery_app import broker_transport_options, celery_config


def test_torch_stays_out_of_the_api_and_the_worker_parent() -> None:
    # CUDA must only ever be initialised in the pool child, and the API never needs torch to start.
    code = (
        "import sys, api.app, worker.celery_app, worker.tasks, worker.main, worker.context, worker.reconciler, uisps.cli\n"
        "api.app.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'core.workflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_celery_configuration_suits_long_jobs(tmp_path) -> None:  # noqa: ANN001
    config = celery_config(Settings(home=tmp_path, broker_url="redis://broker:6379/0", job_visibility_timeout_s=7200))

    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["task_ignore_result"]
    assert config["worker_pool"] == "prefork" and config["worker_concurrency"] == 1
    assert config["broker_transport_options"] == {"visibility_timeout": 7200}


def test_the_embedded_broker_gets_engine_options_not_a_visibility_timeout(tmp_path) -> None:  # noqa: ANN001
    # kombu's SQLAlchemy transport passes its options to create_engine, which refuses unknown ones.
    settings = Settings(home=tmp_path)

    assert settings.effective_broker_url.startswith("sqla+sqlite:")
    assert broker_transport_options(settings) == {"connect_args": {"timeout": 30}}
