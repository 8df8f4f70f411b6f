"""Make a tiny random-weight llama in Hugging Face format (safetensors + BPE tokenizer + ChatML template).

Its output is gibberish, but deterministic under greedy decoding: enough to serve the demo config,
to test stops, lengths, seeds, streaming and batching, and to benchmark the serving path.
Loads with mlx-lm and with vLLM. No download: the tokenizer is trained on the standard library's docstrings.

    python examples/make_tiny_model.py [models/tiny] [--hidden 256 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS_MODULES = ["json", "os", "pathlib", "collections", "asyncio", "argparse", "re", "string", "typing", "itertools"]


def _corpus() -> list[str]:
    """Docstrings of a few standard-library modules: local, English, and the same on every machine."""
    texts = []
    for name in CORPUS_MODULES:
        module = __import__(name)
        texts.append(pydoc.getdoc(module))
        for attr in sorted(dir(module)):
            doc = pydoc.getdoc(getattr(module, attr, None))
            if doc:
                texts.append(doc)
    return texts


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def _random_weights(config: dict, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def dense(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    weights = {"model.embed_tokens.weight": dense(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    weights["lm_head.weight"] = dense(vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": dense(hidden, hidden),
            p + "self_attn.k_proj.weight": dense(kv, hidden),
            p + "self_attn.v_proj.weight": dense(kv, hidden),
            p + "self_attn.o_proj.weight": dense(hidden, hidden),
            p + "mlp.gate_proj.weight": dense(inter, hidden),
            p + "mlp.up_proj.weight": dense(inter, hidden),
            p + "mlp.down_proj.weight": dense(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    return weights


def make_tiny_model(
    path: str | Path, *, hidden: int = 256, layers: int = 4, vocab_size: int = 2048, seed: int = 0
) -> Path:
    """Write the model to `path` (skipped when a model is already there) and return the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    save_file(_random_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="models/tiny")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.path, hidden=args.hidden, layers=args.layers, seed=args.seed)
    print(f"tiny model ready at {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
