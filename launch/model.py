"""`pd make-model`: a small random Llama/Qwen2-style model with a locally trained BPE tokenizer.

No model can be downloaded on the machines pdkv is tested on, so tests and the demo use this one.
Weights are random but deterministic (``seed``); ``init_std`` is large enough that the greedy
continuation depends strongly on every earlier token, so wrong KV visibly changes the output.
The tokenizer is a byte-level BPE trained on the Python standard library's sources of the running
interpreter (read in sorted order, so the result is the same on every machine with that Python).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

ARCHS = ("llama", "qwen2")
SPECIAL = ["<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _corpus(limit_files: int = 150):
    stdlib = os.path.dirname(os.__file__)
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:limit_files]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            yield f.read()


def train_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20,
    }, indent=1))


def make_model(out: str | Path, arch: str = "llama", layers: int = 4, hidden: int = 256, heads: int = 4,
               kv_heads: int = 2, vocab: int = 4096, seed: int = 0, max_position: int = 4096,
               init_std: float = 0.2, dtype: str = "float32") -> Path:
    """Write a HF model directory to ``out`` and return its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    for name, v, lo in (("layers", layers, 1), ("hidden", hidden, 32), ("heads", heads, 1),
                        ("kv-heads", kv_heads, 1), ("vocab", vocab, 300)):
        if v < lo:
            raise ValueError(f"--{name} must be at least {lo}, got {v}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv-heads ({kv_heads})")
    head_dim = hidden // heads
    if head_dim % 32:
        raise ValueError(f"hidden/heads = {head_dim}; vLLM's CPU attention needs a head size multiple of 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
                  initializer_range=init_std, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


def add_arguments(p) -> None:
    p.add_argument("out", help="directory to write the model to")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    path = make_model(args.out, args.arch, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab,
                      args.seed)
    print(f"model written to {path}")
    return 0
