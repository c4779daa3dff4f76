"""Models configuration, the placeholder model and the engine configs derived from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agencyllm.serving.config import ConfigError, load_config, single_model_config
from agencyllm.serving.gateway.streaming import StreamUsage, split_events
from agencyllm.serving.ops.placeholder import HEADS, HIDDEN, TOOL_CALL_TAGS, is_placeholder, write_placeholder_model
from agencyllm.serving.rayserve.engines import check_parsers, llm_config


@pytest.fixture(scope="module")
def placeholder(tmp_path_factory) -> Path:
    return write_placeholder_model(tmp_path_factory.mktemp("models") / "tiny")


def test_placeholder_is_deterministic_and_loadable(placeholder, tmp_path):
    again = write_placeholder_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (placeholder / "model.safetensors").read_bytes()
    config = json.loads((placeholder / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == HIDDEN // HEADS >= 64
    assert is_placeholder(placeholder)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(placeholder), local_files_only=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo ✓"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).count("héllo ✓") == 1


def test_yaml_config_roundtrip(placeholder, tmp_path):
    file = tmp_path / "models.yaml"
    file.write_text(
        f"""
models:
  - id: office-assistant
    path: {placeholder}
    engine_args: {{max_model_len: 512}}
    replicas: 2
    accelerator: {{type: L4, gpus: 1}}
"""
    )
    config = load_config(file)
    spec = config.models[0]
    assert spec.replicas.min == spec.replicas.max == 2
    assert spec.context_length() == 512
    gpu = llm_config(spec, cpu=False)
    assert gpu.accelerator_type == "L4"
    assert gpu.experimental_configs["stream_batching_interval_ms"] == spec.stream_coalesce_ms
    cpu = llm_config(spec, cpu=True)
    assert cpu.engine_kwargs["dtype"] == "float32" and cpu.accelerator_type is None
    assert cpu.runtime_env["env_vars"]["VLLM_NO_USAGE_STATS"] == "1"


def test_custom_resources_go_into_the_replica_s_first_bundle(placeholder):
    spec = single_model_config(placeholder).models[0]
    spec = type(spec).model_validate({**spec.model_dump(), "accelerator": {"gpus": 2, "resources": {"engine_node": 1}}})
    gpu = llm_config(spec, cpu=False).placement_group_config["bundles"]
    assert gpu == [{"CPU": 1, "GPU": 1, "engine_node": 1}, {"CPU": 1, "GPU": 1}]
    cpu = llm_config(spec, cpu=True).placement_group_config["bundles"]
    assert cpu == [{"CPU": 1, "GPU": 0, "engine_node": 1}]


@pytest.mark.parametrize("resources", [{"GPU": 1}, {"node:10.0.0.1": 1}, {"engine_node": 0}, {"engine_node": -1}])
def test_a_resource_that_is_not_a_custom_one_is_refused(placeholder, tmp_path, resources):
    file = tmp_path / "models.yaml"
    model = {"id": "a", "path": str(placeholder), "accelerator": {"resources": resources}}
    file.write_text(json.dumps({"models": [model]}))
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert "models.0.accelerator.resources" in str(err.value)


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("models: []", "models"),
        ("models:\n  - id: a\n    path: /nowhere", "models.0.path"),
        ("models:\n  - id: a\n    path: {p}\n    replicas: {{min: 3, max: 1}}", "models.0.replicas"),
        ("models:\n  - id: a\n    path: {p}\n    tasks: generate", "models.0.tasks"),
        ("models:\n  - id: a\n    path: {p}\n  - id: a\n    path: {p}", "unique"),
        ("models:\n  - id: 'bad id!'\n    path: {p}", "models.0.id"),
        ("models: [", "not valid YAML"),
    ],
)
def test_invalid_config_names_the_field(placeholder, tmp_path, yaml_text, named):
    file = tmp_path / "models.yaml"
    file.write_text(yaml_text.format(p=placeholder))
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert named in str(err.value)


def test_single_model_directory_uses_its_name(placeholder):
    assert single_model_config(placeholder).models[0].id == "tiny"
    with pytest.raises(ConfigError):
        single_model_config(placeholder.parent / "missing")


def test_stream_usage_strips_usage_chunk_and_counts():
    usage = StreamUsage()
    events = split_events(
        [
            'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
            'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
            "data: [DONE]\n\n",
        ]
    )
    kept = [e for e in events if usage.observe(e)]
    assert len(kept) == 2 and "usage" not in "".join(kept)
    assert (usage.prompt_tokens, usage.best_completion_tokens()) == (3, 2)


def test_tool_calling_reasoning_and_template_settings_reach_vllm(placeholder, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    spec = single_model_config(placeholder).models[0]
    # Without a parser of its own, one that needs nothing of the model: required and named choices
    # are guided decoding (the gateway refuses auto for it).
    bare = llm_config(spec, cpu=True).engine_kwargs
    assert (bare["enable_auto_tool_choice"], bare["tool_call_parser"]) == (True, "pythonic")
    assert not {"reasoning_parser", "chat_template"} & set(bare)
    spec = type(spec).model_validate(
        {
            **spec.model_dump(),
            "tool_call_parser": "hermes",
            "auto_tool_choice": False,  # the gateway refuses `auto`; vLLM needs its flag for the parser
            "reasoning_parser": "qwen3",
            "chat_template": template,
        }
    )
    args = llm_config(spec, cpu=True).engine_kwargs
    assert (args["enable_auto_tool_choice"], args["tool_call_parser"]) == (True, "hermes")
    assert (args["reasoning_parser"], args["chat_template"]) == ("qwen3", str(template))
    check_parsers(spec)  # both names exist in this vLLM


@pytest.mark.parametrize(
    ("setting", "name"), [("tool_call_parser", "no_such_parser"), ("reasoning_parser", "no_such_reasoner")]
)
def test_a_parser_vllm_does_not_have_is_refused_before_any_engine_starts(placeholder, setting, name):
    spec = single_model_config(placeholder).models[0]
    spec = type(spec).model_validate({**spec.model_dump(), setting: name})
    with pytest.raises(ConfigError, match=f"{setting} '{name}'"):
        check_parsers(spec)


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"engine_args": {"tool_call_parser": "hermes"}}, "model setting `tool_call_parser`"),
        ({"engine_args": {"enable_auto_tool_choice": True}}, "model setting `tool_call_parser`"),
        ({"engine_args": {"chat_template": "/x"}}, "model setting `chat_template`"),
        ({"chat_template": "/no/such/template.jinja"}, "no chat template file"),
        ({"tool_call_parser": "hermes; rm -rf /"}, "tool_call_parser"),
    ],
)
def test_tool_settings_have_one_home_and_are_checked(placeholder, tmp_path, model, named):
    file = tmp_path / "models.yaml"
    file.write_text(json.dumps({"models": [{"id": "a", "path": str(placeholder), **model}]}))
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(file)


def test_the_placeholder_renders_tools_and_tool_calls_with_its_tags(placeholder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(placeholder), local_files_only=True)
    assert all(tag in tokenizer.get_vocab() for tag in TOOL_CALL_TAGS)  # what vLLM's hermes parser looks up
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered.split("</tools>")[0]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    assert "<|start_header_id|>tool<|end_header_id|>\n\nsunny" in rendered
