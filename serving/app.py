"""The Ray Serve application: one vLLM engine deployment per model behind our ingress deployment.

`build_app` is the application builder a Serve config names (`serve deploy`, KubeRay's
`serveConfigV2`):

```yaml
applications:
  - name: agencyllm
    route_prefix: /
    import_path: agencyllm.serving.app:build_app
    args: {models: [{id: llama-3.1-8b-instruct, path: /models/llama-3.1-8b-instruct}]}
```

`args` holds only the models (the same schema as `--config`): it is visible in the Serve config and
the custom resource, so settings and secrets come from `AGENCYLLM_*` environment variables.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from agencyllm.serving.config import ConfigError, ServingConfig, cpu_only, parse_config
from agencyllm.serving.engines import engine_deployment
from agencyllm.serving.ray_adapter import AgencyIngress
from agencyllm.serving.placement import ingress_cpus
from agencyllm.serving.settings import Settings

APP_NAME = "agencyllm"


def build_application(settings: Settings, serving: ServingConfig, *, cpu: bool | None = None) -> Application:
    if settings.database_url is None:
        raise ValueError("build_application needs settings.database_url (the local run fills it in)")
    cpu = cpu_only(settings.force_cpu) if cpu is None else cpu
    logging_config = {"enable_access_log": settings.access_log}
    engines = {spec.id: engine_deployment(spec, cpu=cpu, logging_config=logging_config) for spec in serving.models}
    ingress = serve.deployment(
        AgencyIngress,
        name="AgencyIngress",
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": ingress_cpus(settings, serving, cpu=cpu)},
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
        raise ConfigError("AGENCYLLM_DATABASE_URL must be set where the application is built (a Serve config has no embedded database)")
    return build_application(settings, serving)
