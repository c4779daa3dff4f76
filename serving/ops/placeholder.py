"""A tiny Llama with random weights, a real BPE tokenizer and a chat template.

It lets the platform, its tests and its benchmarks run the real vLLM engine on any machine,
offline, in seconds. Its output is gibberish: it is a stand-in for the agency's own weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 20260101
VOCAB_SIZE = 512
HIDDEN = 128
LAYERS = 2
HEADS = 2  # head_dim 64: vLLM's CPU attention backend rejects smaller heads
INTERMEDIATE = 256
CONTEXT = 1024

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

# Tool calls are written Hermes-style (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
# what vLLM's `hermes` parser reads; the tags are tokens of their own) and the tools are listed in a
# system turn, so their definitions count in the prompt as with real models.
TOOL_CALL_TAGS = ["<tool_call>", "</tool_call>"]
TOOL_CALL_PARSER = "hermes"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools you may call:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call one as <tool_call>{"name": NAME, "arguments": ARGUMENTS}</tool_call><|eot_id|>{% endif %}'
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    '<tool_call>{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Written into its README: a placeholder of an older format is written again.
FORMAT = 2

# Training text for the tokenizer: plain public-service English, so common words become tokens.
_CORPUS = [
    "The agency publishes its annual report on public services, budgets and performance.",
    "Please summarise the attached memorandum for the deputy director by Friday.",
    "Citizens may request records under the freedom of information act.",
    "The office of management reviews procurement, security and privacy controls.",
    "Hello! How can I help you today? Write a short answer in plain language.",
    "Tokens, quotas and usage are recorded for every tenant and every user.",
    "def main():\n    print('hello world')\n    return 0\n",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2026 January February March April May June",
    "system user assistant tool function message content role name",
]


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown input
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False) for tag in TOOL_CALL_TAGS])
    return tokenizer


def _random_weights(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": dense(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{proj}.weight"] = dense(HIDDEN, HIDDEN)
        tensors[p + "mlp.gate_proj.weight"] = dense(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = dense(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = dense(HIDDEN, INTERMEDIATE)
        tensors[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["lm_head.weight"] = dense(vocab, HIDDEN)
    return tensors


def write_placeholder_model(directory: Path) -> Path:
    """Write the placeholder model into `directory` (created if needed) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos, eot = (tokenizer.token_to_id(t) for t in (BOS, EOS, EOT))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": [eos, eot],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOS,
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": True}
    for name, content in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": EOS}),
        ("generation_config.json", generation_config),
    ):
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    save_file(_random_weights(vocab), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "README.md").write_text(
        "# agencyllm placeholder model\n\nRandom weights (fixed seed): output is gibberish. "
        f"For development and tests only; configure real weights for staff.\n\nformat {FORMAT}\n"
    )
    return directory


def is_placeholder(directory: Path) -> bool:
    readme = Path(directory) / "README.md"
    return readme.exists() and readme.read_text().startswith("# agencyllm placeholder model")


def is_current_placeholder(directory: Path) -> bool:
    """A placeholder written by this version (older ones lack the tool-call tokens)."""
    return is_placeholder(directory) and f"format {FORMAT}\n" in (Path(directory) / "README.md").read_text()
