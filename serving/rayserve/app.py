"""The Ray Serve application: one vLLM engine deployment per model behind our ingress deployment.

`build_app` is the application builder a Serve config names (`serve deploy`, KubeRay's
`serveConfigV2`):

```yaml
applications:
  - name: agencyllm
    route_prefix: /
    import_path: agencyllm.serving.rayserve.app:build_app
    args: {models: [{id: llama-3.1-8b-instruct, path: /models/llama-3.1-8b-instruct}]}
```

`args` holds only the models (the same schema as `--config`): it is visible in the Serve config and
the custom resource, so settings and secrets come from `AGENCYLLM_*` environment variables.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from agencyllm.serving.config import ENGINE_PREFIX, ConfigError, ModelSpec, ServingConfig, parse_config
from agencyllm.serving.rayserve.engines import check_parsers, engine_deployment
from agencyllm.serving.rayserve.ingress import AgencyIngress, EngineGateway
from agencyllm.serving.rayserve.placement import ingress_cpus
from agencyllm.serving.rayserve.platform import cpu_only
from agencyllm.serving.settings import Settings

APP_NAME = "agencyllm"
INGRESS_NAME = "AgencyIngress"
INGRESS_MAX_ONGOING = 1024
# Every Ray head node offers this resource (1 unit); a small share of it keeps an actor there.
HEAD_NODE_RESOURCE = "node:__internal_head__"
HEAD_NODE_SHARE = 0.001


def gateway_engine(serving: ServingConfig, *, engine_http: bool) -> ModelSpec | None:
    """The model whose engine replica serves the gateway itself, if `engine_http`: the first
    generate model, when it runs one replica (only one replica can own the port)."""
    if not engine_http:
        return None
    spec = next((m for m in serving.models if m.task != "embed"), None)
    return spec if spec is not None and spec.replicas.max == 1 else None


def ingress_name(serving: ServingConfig, *, engine_http: bool) -> str:
    """The deployment that serves HTTP (and ends its streams at stop)."""
    host = gateway_engine(serving, engine_http=engine_http)
    return INGRESS_NAME if host is None else f"{ENGINE_PREFIX}{host.id}"


def build_application(
    settings: Settings, serving: ServingConfig, *, cpu: bool | None = None, engine_http: bool = False
) -> Application:
    """Engines behind the `AgencyIngress` deployment; with `engine_http` (the local run with
    direct ingress), one model's engine replica serves the gateway itself instead."""
    if settings.database_url is None:
        raise ValueError("build_application needs settings.database_url (the local run fills it in)")
    cpu = cpu_only(settings.force_cpu) if cpu is None else cpu
    for spec in serving.models:
        check_parsers(spec)
    logging_config = {"enable_access_log": settings.access_log}
    host = gateway_engine(serving, engine_http=engine_http)
    engines = {
        spec.id: engine_deployment(spec, cpu=cpu, logging_config=logging_config)
        for spec in serving.models
        if spec is not host
    }
    if host is not None:
        return engine_deployment(
            host,
            cpu=cpu,
            logging_config=logging_config,
            server_cls=EngineGateway,
            bind_kwargs={"engines": engines, "settings": settings, "serving": serving},
            serve_options={"max_ongoing_requests": INGRESS_MAX_ONGOING},
        )
    actor_options: dict = {"num_cpus": ingress_cpus(settings, serving, cpu=cpu)}
    if settings.ingress_pinned_to_head:
        actor_options["resources"] = {HEAD_NODE_RESOURCE: HEAD_NODE_SHARE}
    ingress = serve.deployment(
        AgencyIngress,
        name=INGRESS_NAME,
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options=actor_options,
        logging_config=logging_config,
    )
    return ingress.bind(engines, settings=settings, serving=serving)


def application_config(args: object) -> ServingConfig:
    """Validate a Serve config's `args` (`{"models": [...]}`, the models YAML schema) without
    building anything. Ray hands the builder a plain dict, so this is the only check it gets."""
    if not isinstance(args, dict):
        raise ConfigError(f"application args must be a mapping with a 'models' list, not {type(args).__name__}")
    unknown = sorted(map(str, set(args) - {"models"}))
    if unknown:
        raise ConfigError(
            f"application args: unknown field(s) {', '.join(unknown)}; only 'models' belongs here "
            "(settings and secrets come from AGENCYLLM_* environment variables)"
        )
    if "models" not in args:
        raise ConfigError("application args: 'models' is required (the list of models to serve)")
    return parse_config(args, "application args")


def build_app(args: dict) -> Application:
    """Serve config entry point: `args` is `{"models": [...]}`; everything else from the environment."""
    serving = application_config(args)
    settings = Settings()
    if settings.database_url is None:
        raise ConfigError(
            "AGENCYLLM_DATABASE_URL must be set where the application is built "
            "(a Serve config has no embedded database)"
        )
    return build_application(settings, serving)
