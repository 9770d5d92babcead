"""`pd make-model`: a small random Llama/Qwen2-style model with a locally trained BPE tokenizer.

No model can be downloaded on the machines pdkv is tested on, so tests and the demo use this one.
Weights are random but deterministic (``seed``); ``init_std`` is large enough that the greedy
continuation depends strongly on every earlier token, so wrong KV visibly changes the output.
The tokenizer is a byte-level BPE trained on the Python standard library's sources of the running
interpreter (read in sorted order, so the result is the same on every machine with that Python).

``--shape llama3-8b`` writes a model of Llama-3-8B's shape (32 layers, hidden 4096, 32 heads, 8 KV
heads, head 128, intermediate 14336, bfloat16; the vocabulary is the local tokenizer's) for GPU
measurements: ``--weights none`` writes only config.json and the tokenizer, for vLLM's
``--load-format dummy``; ``--weights random`` writes seeded normal weights (std ``--init-std``,
default 0.02) tensor by tensor as safetensors shards, on the GPU when there is one (16 GB for 8B).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

ARCHS = ("llama", "qwen2")
WEIGHTS = ("hf", "none", "random")
# Named shapes: the architecture of a real model, with the local tokenizer's vocabulary.
SHAPES = {
    "llama3-8b": dict(arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                      vocab=32000, max_position=16384, rope_theta=500000.0, dtype="bfloat16", init_std=0.02),
}
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


def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_norm) of every weight of a Llama-style model, in a stable order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h), False)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), True), (p + "self_attn.q_proj.weight", (h, h), False),
                (p + "self_attn.k_proj.weight", (kv, h), False), (p + "self_attn.v_proj.weight", (kv, h), False),
                (p + "self_attn.o_proj.weight", (h, h), False), (p + "post_attention_layernorm.weight", (h,), True),
                (p + "mlp.gate_proj.weight", (i, h), False), (p + "mlp.up_proj.weight", (i, h), False),
                (p + "mlp.down_proj.weight", (h, i), False)]
    return out + [("model.norm.weight", (h,), True), ("lm_head.weight", (v, h), False)]


def write_random_weights(out: Path, cfg: dict, seed: int, std: float, dtype: str,
                         shard_bytes: int = 4 << 30) -> int:
    """Seeded normal(0, ``std``) weights (norms 1) as safetensors shards + index; returns bytes written.

    Each tensor has its own generator seed (``seed`` + its index), so the weights do not depend
    on the device or the shard size. Generated on the GPU when there is one.
    """
    import torch
    from safetensors.torch import save_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    shapes = _tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...], bool, int]]] = [[]]
    size = 0
    for k, (name, shape, norm) in enumerate(shapes):
        nbytes = tdtype.itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, norm, k))
        size += nbytes
    weight_map, total = {}, 0
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, norm, k in shard:
            if norm:
                t = torch.ones(shape, dtype=tdtype)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 100003 + k)
                t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=g)
                t = t.to(tdtype).cpu()
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def make_shaped_model(out: str | Path, shape: str, weights: str = "none", seed: int = 0,
                      init_std: float | None = None, vocab: int | None = None) -> Path:
    """A model of a named shape (``SHAPES``) with the local tokenizer; weights none or random."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r} is not known; choose one of {', '.join(SHAPES)}")
    if weights not in ("none", "random"):
        raise ValueError(f"--weights {weights!r} is not allowed with --shape; choose none or random")
    s = SHAPES[shape]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, vocab or s["vocab"])
    from tokenizers import Tokenizer

    n_vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=s["max_position"],
                      rope_theta=s["rope_theta"], initializer_range=init_std or s["init_std"],
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    cfg.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data.update(torch_dtype=s["dtype"], dtype=s["dtype"], architectures=["LlamaForCausalLM"])
    data.setdefault("rope_theta", s["rope_theta"])
    (out / "config.json").write_text(json.dumps(data, indent=1))
    for stale in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if weights == "random":
        write_random_weights(out, data, seed, init_std or s["init_std"], s["dtype"])
    return out


def make_model(out: str | Path, arch: str = "llama", layers: int = 4, hidden: int = 256, heads: int = 4,
               kv_heads: int = 2, vocab: int = 4096, seed: int = 0, max_position: int = 4096,
               init_std: float = 0.2, dtype: str = "float32") -> Path:
    """Write a HF model directory to ``out`` and return its path."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

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
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a real model's shape (layers, sizes, bfloat16) instead of the small test model; "
                        "the --layers/--hidden/... flags are then ignored, --vocab is the tokenizer's target")
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="hf: the small model's HF-initialized weights (default without --shape); none: "
                        "config.json + tokenizer only, for vLLM's --load-format dummy (default with --shape); "
                        "random: seeded normal weights of std --init-std as safetensors (with --shape)")
    p.add_argument("--no-weights", dest="weights", action="store_const", const="none",
                   help="same as --weights none")
    p.add_argument("--init-std", type=float, default=None, help="std of --weights random (default 0.02)")


def run(args) -> int:
    if getattr(args, "shape", None):
        vocab = args.vocab if args.vocab != 4096 else None  # 4096 is the small model's default
        path = make_shaped_model(args.out, args.shape, args.weights or "none", args.seed, args.init_std, vocab)
    else:
        if args.weights not in (None, "hf"):
            raise ValueError(f"--weights {args.weights} needs --shape (the small model always has weights)")
        path = make_model(args.out, args.arch, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab,
                          args.seed)
    print(f"model written to {path}")
    return 0
