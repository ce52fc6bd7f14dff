"""core.broker: the Celery configuration that suits jobs of minutes, on each broker."""

from __future__ import annotations

from core.broker import broker_transport_options, celery_config
from core.settings import Settings


def test_the_celery_configuration_suits_long_jobs(tmp_path) -> None:  # noqa: ANN001
    config = celery_config(Settings(home=tmp_path, broker_url="redis://broker:6379/0", job_visibility_timeout_s=7200))

    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["task_ignore_result"]
    assert config["worker_pool"] == "prefork" and config["worker_concurrency"] == 1
    assert config["broker_transport_options"] == {"visibility_timeout": 7200, "priority_steps": list(range(10))}


def test_the_embedded_broker_gets_engine_options_not_a_visibility_timeout(tmp_path) -> None:  # noqa: ANN001
    # kombu's SQLAlchemy transport passes its options to create_engine, which refuses unknown ones.
    settings = Settings(home=tmp_path)

    assert settings.effective_broker_url.startswith("sqla+sqlite:")
    assert broker_transport_options(settings) == {"connect_args": {"timeout": 30}}
