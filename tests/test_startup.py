"""Start-up: the ingress's CPU reservation, access logs off by default, the engines' warm-up
request, and the progress lines `agencyllm up` shows (its own start is in test_fault_up.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.rayserve.placement import engines_cpus, ingress_cpus
from agencyllm.serving.settings import Settings


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> ServingConfig:
    """The default shape: one generate and one embedding engine, 1 CPU each on CPU hosts."""
    weights = write_placeholder_model(tmp_path_factory.mktemp("weights") / "placeholder")
    return ServingConfig(models=[ModelSpec(id="chat", path=weights), ModelSpec(id="embed", path=weights, task="embed")])


# ---- AGENCYLLM_INGRESS_CPUS ------------------------------------------------------------------


def test_engines_take_their_bundles_and_the_replica_actor(two_models):
    # Each CPU engine: its 1-CPU bundle plus the replica actor's CPU; GPU engines: 1 per GPU + 1.
    assert engines_cpus(two_models, cpu=True) == 4
    gpu = ServingConfig(models=[ModelSpec(id="big", path=two_models.models[0].path, accelerator={"gpus": 2})])
    assert engines_cpus(gpu, cpu=False) == 3


def test_ingress_gets_a_cpu_only_where_the_engines_leave_one_per_replica(two_models):
    two_ingress = Settings(ingress_replicas=2)
    # A 2-core host: the engines take the cores, so the ingress reserves none and still schedules.
    assert ingress_cpus(two_ingress, two_models, cpu=True, total_cpus=2) == 0
    assert ingress_cpus(two_ingress, two_models, cpu=True, total_cpus=5) == 0  # one spare, two replicas
    assert ingress_cpus(two_ingress, two_models, cpu=True, total_cpus=6) == 1
    assert ingress_cpus(Settings(), two_models, cpu=True, total_cpus=16) == 1


def test_configured_ingress_cpus_win(two_models):
    assert ingress_cpus(Settings(ingress_cpus=0.5), two_models, cpu=True, total_cpus=2) == 0.5
    assert ingress_cpus(Settings(ingress_cpus=0), two_models, cpu=True, total_cpus=64) == 0


def test_without_a_total_the_default_asks_the_ray_cluster(two_models, monkeypatch):
    from agencyllm.serving.rayserve import placement

    monkeypatch.setattr(placement, "cluster_cpus", lambda: None)  # not connected to Ray
    assert ingress_cpus(Settings(), two_models, cpu=True) == 0
    monkeypatch.setattr(placement, "cluster_cpus", lambda: 16.0)  # e.g. a KubeRay cluster's CPUs
    assert ingress_cpus(Settings(), two_models, cpu=True) == 1


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("AGENCYLLM_INGRESS_CPUS", "2")
    monkeypatch.setenv("AGENCYLLM_ACCESS_LOG", "true")
    settings = Settings()
    assert settings.ingress_cpus == 2.0 and settings.access_log is True
    monkeypatch.delenv("AGENCYLLM_INGRESS_CPUS")
    monkeypatch.delenv("AGENCYLLM_ACCESS_LOG")
    assert Settings().ingress_cpus is None and Settings().access_log is False
    monkeypatch.setenv("AGENCYLLM_INGRESS_CPUS", "-1")
    with pytest.raises(ValueError, match="AGENCYLLM_INGRESS_CPUS"):
        Settings()


def _rendered_env(values: dict) -> tuple[dict[str, str], dict]:
    """The head container's AGENCYLLM_* values and the Serve config, as the chart renders them."""
    import helm_python
    import yaml

    chart = helm_python.Chart.load(str(Path(__file__).resolve().parents[1] / "infra" / "helm" / "agencyllm"))
    try:
        rendered = chart.render(values, name="agencyllm", namespace="llm", is_install=True)
    finally:
        chart.close()
    docs = [
        d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d
    ]
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"] if e["name"].startswith("AGENCYLLM_")}
    return env, yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def test_chart_passes_both_settings(monkeypatch):
    env, serve_config = _rendered_env({})
    assert env["AGENCYLLM_ACCESS_LOG"] == "false" and "AGENCYLLM_INGRESS_CPUS" not in env  # default: decided at build
    assert serve_config["logging_config"] == {"enable_access_log": False}  # the HTTP proxy's and controller's
    env, serve_config = _rendered_env({"config": {"ingressCpus": 2, "accessLog": True}})
    assert env["AGENCYLLM_ACCESS_LOG"] == "true" and env["AGENCYLLM_INGRESS_CPUS"] == "2"
    assert serve_config["logging_config"] == {"enable_access_log": True}
    for name in ("AGENCYLLM_ACCESS_LOG", "AGENCYLLM_INGRESS_CPUS"):  # what the platform reads back
        monkeypatch.setenv(name, env[name])
    settings = Settings()
    assert settings.ingress_cpus == 2 and settings.access_log is True


def test_chart_refuses_negative_ingress_cpus():
    with pytest.raises(Exception, match="ingressCpus"):
        _rendered_env({"config": {"ingressCpus": -1}})


# ---- the engines' warm-up request ------------------------------------------------------------


def _stream(*items):
    async def gen():
        for item in items:
            yield item

    return gen()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error(code: int, message: str):
    from ray.serve.llm.openai_api_models import ErrorResponse

    return ErrorResponse.model_validate(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": code}}
    )


class FakeServer:
    """Answers like FairLLMServer's OpenAI methods: an awaitable returning an async stream."""

    def __init__(self, chat=None, completions=None, embeddings=None) -> None:
        self.answers = {"chat": chat, "completions": completions, "embeddings": embeddings}
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name):
        if name not in ("chat", "completions", "embeddings"):
            raise AttributeError(name)

        async def method(request, raw_request_info=None, ticket=None):
            self.calls.append((name, request))
            return _stream(*self.answers[name])

        return method


def test_generate_models_warm_up_with_one_streamed_chat():
    from agencyllm.serving.rayserve import engines

    chunk = _sse({"choices": [{"delta": {"content": "an error-free word"}}]})
    server = FakeServer(chat=[[chunk], ["data: [DONE]\n\n"]])
    asyncio.run(engines.warm_request(server, "chat", embed=False))
    assert [name for name, _ in server.calls] == ["chat"]
    request = server.calls[0][1]
    assert request.stream is True and request.max_tokens == 2 and request.model == "chat"


def test_a_model_without_chat_template_warms_up_with_a_completion():
    from agencyllm.serving.rayserve import engines

    server = FakeServer(chat=[_error(400, "no chat template")], completions=[[_sse({"choices": [{"text": "x"}]})]])
    asyncio.run(engines.warm_request(server, "base", embed=False))
    assert [name for name, _ in server.calls] == ["chat", "completions"]


def test_embedding_models_warm_up_with_one_embedding():
    from agencyllm.serving.rayserve import engines

    server = FakeServer(embeddings=[{"data": [{"embedding": [0.1]}]}])
    asyncio.run(engines.warm_request(server, "embed", embed=True))
    assert [name for name, _ in server.calls] == ["embeddings"]
    assert server.calls[0][1].input == engines.WARM_UP_PROMPT


@pytest.mark.parametrize(
    "answers",
    [
        {"chat": [_error(500, "engine exploded")]},
        {"chat": [[_sse({"error": {"message": "engine exploded", "code": 500}})]]},
        {"chat": [_error(400, "no template")], "completions": [_error(400, "bad prompt")]},
    ],
    ids=["error-response", "error-in-stream", "completion-refused-too"],
)
def test_a_failed_warm_up_fails_with_the_model_and_reason(answers):
    from agencyllm.serving.rayserve import engines

    with pytest.raises(engines.WarmUpFailed, match=r"model chat: the warm-up request failed \((500|400)\)"):
        asyncio.run(engines.warm_request(FakeServer(**answers), "chat", embed=False))


def test_a_warm_up_that_hangs_fails_after_its_timeout(monkeypatch):
    from agencyllm.serving.rayserve import engines

    async def hang(*_args, **_kwargs):
        await asyncio.sleep(30)

    monkeypatch.setattr(engines, "warm_request", hang)
    monkeypatch.setattr(engines, "WARM_UP_TIMEOUT_SECONDS", 0.05)

    started = time.monotonic()
    with pytest.raises(engines.WarmUpFailed, match="model chat: the warm-up request took over"):
        asyncio.run(engines.warm_up(FakeServer(), "chat", embed=False))
    assert time.monotonic() - started < 5


# ---- progress lines ---------------------------------------------------------------------------


def test_the_stack_process_reports_steps_and_messages_on_its_pipe(capsys):
    from agencyllm.serving.ops.progress import Progress, Reporter

    read, write = os.pipe()
    reporter = Reporter(write)
    reporter.step("Ray started")
    reporter.say("could not start: no model at /x\n(config.json not found)")
    reporter.step("Ready: http://127.0.0.1:1/v1")
    reporter.close()

    progress = Progress(time.monotonic() - 12.34)
    relay = threading.Thread(target=progress.relay, args=(os.fdopen(read, encoding="utf-8"),))
    relay.start()
    relay.join(10)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[  12.3s] Ray started", "[  12.3s] Ready: http://127.0.0.1:1/v1"]
    assert err == "agencyllm: could not start: no model at /x (config.json not found)\n"


def test_without_a_pipe_the_stack_process_prints_plainly(capsys):
    from agencyllm.serving.ops.progress import Reporter

    Reporter(None).step("Ready: http://127.0.0.1:1/v1")
    assert capsys.readouterr().out == "Ready: http://127.0.0.1:1/v1\n"


def test_supervisor_imports_neither_ray_nor_vllm():
    """`agencyllm up` prints its first line at once: importing vLLM takes seconds, and the stack
    process imports it anyway."""
    import subprocess
    import sys

    code = (
        "import sys, agencyllm.serving.cli.main as cli, agencyllm.serving.ops.supervisor, agencyllm.serving.ops.stack\n"
        "cli.build_parser()\n"
        "heavy = sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# ---- on the running stack (the session's, tests/conftest.py) ----------------------------------


def test_the_access_log_setting_turns_them_on(stack):
    """The session's stack runs with AGENCYLLM_ACCESS_LOG=true (other tests read those lines);
    off by default is checked on `agencyllm up` in test_fault_up.py."""
    assert stack.settings.access_log is True and Settings().access_log is False
    client = stack.openai()
    client.chat.completions.create(model="placeholder", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 10  # Serve's log handlers flush asynchronously
    while True:
        ingress = "".join(p.read_text(errors="replace") for p in stack.serve_logs.glob("replica_*AgencyIngress*.log"))
        engine = "".join(
            p.read_text(errors="replace") for p in stack.serve_logs.glob("replica_*LLMServer_placeholder*.log")
        )
        found = "POST /v1/chat/completions 200" in ingress and "CALL chat OK" in engine
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found, "no access log lines with AGENCYLLM_ACCESS_LOG=true"


def test_ingress_reserves_what_the_host_leaves(stack):
    """On this host the engines take every real core: the ingress replicas reserve none, and
    the CPUs Ray hands out are exactly the engines' bundles."""
    import ray

    from agencyllm.serving.rayserve.placement import host_cores

    serving = stack.stack.serving
    expected = ingress_cpus(
        stack.settings.model_copy(update={"ingress_cpus": None}), serving, cpu=True, total_cpus=host_cores()
    )
    assert stack.settings.ingress_cpus == expected
    used = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)
    assert used == pytest.approx(engines_cpus(serving, cpu=True) + stack.settings.ingress_replicas * expected)


def test_engines_answered_before_ready(stack):
    """Each engine replica served its warm-up request before it counted as running."""
    for model in ("placeholder", "all-MiniLM-L6-v2"):
        logs = sorted(stack.serve_logs.glob(f"replica_*LLMServer_{model}_*.log"))
        assert logs, model
        text = "".join(log.read_text(errors="replace") for log in logs)
        warmed = text.find(f"model {model} answered its warm-up request")
        ready = text.find("Finished initializing replica")
        assert warmed != -1, f"{model} logged no warm-up"
        assert ready == -1 or warmed < ready, f"{model} became ready before its warm-up answered"


def test_progress_output_parses():
    """The format the `up` test in test_fault_up.py relies on."""
    from agencyllm.serving.ops.progress import Progress

    buffer = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buffer):
        Progress(time.monotonic()).step("database ready")
    assert buffer.getvalue().startswith("[   0.0s] database ready")
