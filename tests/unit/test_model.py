"""The synthetic test model (launch.model): loadable, deterministic, and its output depends on the KV."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launch.model import make_model  # noqa: E402

SMALL = dict(layers=2, hidden=64, heads=2, kv_heads=1, vocab=512, max_position=512)
PROMPTS = ["def main(args):", "The quick brown fox", "import os\nimport sys", "class Foo(object):",
           "Hello world, this is a test."]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "tiny", **SMALL)


@pytest.fixture(scope="module")
def loaded(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return tok, model


def _greedy(model, ids: list[int], n: int = 12) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_files_and_config(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64 and cfg["vocab_size"] == 512
    assert cfg["num_key_value_heads"] == 1 and cfg["max_position_embeddings"] == 512
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tcfg and tcfg["eos_token"] == "</s>"


def test_tokenizer_and_chat_template(loaded):
    tok, _ = loaded
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<unk>"]) == [0, 1, 2]
    text = "def f(x):\n    return x + 1  # üñí"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in chat and chat.rstrip().endswith("assistant")


def test_deterministic(tmp_path, model_dir):
    again = make_model(tmp_path / "again", **SMALL)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(again / name) == _digest(model_dir / name), name
    other = make_model(tmp_path / "other", seed=1, **SMALL)
    assert _digest(other / "model.safetensors") != _digest(model_dir / "model.safetensors")


def test_greedy_depends_on_prompt(loaded):
    tok, model = loaded
    outs = [tuple(_greedy(model, tok(p).input_ids)) for p in PROMPTS]
    assert len(set(outs)) == len(outs), outs
    for o in outs:
        assert len(set(o)) > 3, f"degenerate continuation {o}"


def test_early_token_changes_continuation(loaded):
    """Perturbing one early token (i.e. its KV) changes what comes after a long context."""
    tok, model = loaded
    ids = tok("Hello world, this is a test of the system. " * 6).input_ids
    base = _greedy(model, ids)
    changed = 0
    for pos in (0, 1, 2):
        alt = list(ids)
        alt[pos] = (alt[pos] + 7) % 512
        changed += _greedy(model, alt) != base
    assert changed >= 2, "the continuation barely depends on early context"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_model(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="head size"):
        make_model(tmp_path / "x", hidden=48, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="divide"):
        make_model(tmp_path / "x", hidden=64, heads=2, kv_heads=3)


def test_qwen2_loads(tmp_path):
    d = make_model(tmp_path / "q", arch="qwen2", layers=1, hidden=64, heads=2, kv_heads=1, vocab=400,
                   max_position=256)
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2"
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert len(_greedy(model, [5, 6, 7], n=4)) == 4


def test_cli_bad_argument_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "launch.cli", "make-model", str(tmp_path / "x"), "--hidden", "48",
                        "--heads", "2", "--kv-heads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("pd make-model: error:") and "head size" in r.stderr


# ---- random token prompts, wrong KV, argument checks -------------------------------------


def _rand_ids(gen, n: int, vocab: int = 512) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()  # no special tokens


def test_random_prompts_give_distinct_non_degenerate_continuations(loaded):
    _, model = loaded
    gen = torch.Generator().manual_seed(1234)
    prompts = [_rand_ids(gen, 64) for _ in range(4)]
    outs = [_greedy(model, p, n=8) for p in prompts]
    assert all(len(o) == 8 for o in outs)
    assert len({tuple(o) for o in outs}) == 4, outs  # pairwise different
    for o in outs:
        assert len(set(o)) > 1, f"a single repeated token: {o}"
    for p, o in zip(prompts, outs):  # one early token changed -> another continuation
        alt = list(p)
        alt[1] = 3 + (alt[1] - 3 + 101) % (512 - 3)
        assert _greedy(model, alt, n=8) != o, "the continuation does not depend on token 1"


@torch.no_grad()
def _greedy_from_cache(model, cache, tail: list[int], n: int = 8) -> list[int]:
    """Greedy tokens after ``tail``, given ``cache`` (the KV of everything before it)."""
    out = model(input_ids=torch.tensor([tail]), past_key_values=cache, use_cache=True)
    toks = []
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return toks


@torch.no_grad()
def _kv(model, ids: list[int]):
    return model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values


def test_wrong_kv_changes_the_output(loaded):
    """Continuing from KV of a different prefix (same length) gives other tokens than the right KV."""
    _, model = loaded
    gen = torch.Generator().manual_seed(99)
    for _ in range(3):
        prefix, other, tail = _rand_ids(gen, 64), _rand_ids(gen, 64), _rand_ids(gen, 8)
        right = _greedy_from_cache(model, _kv(model, prefix), tail)
        # the cache path is the same computation as a plain generate over the whole prompt
        assert right == _greedy(model, prefix + tail, n=8)
        wrong = _greedy_from_cache(model, _kv(model, other), tail)
        assert wrong != right, "KV of another prefix gave the same output"
        one_off = list(prefix)
        one_off[0] = 3 + (one_off[0] - 3 + 57) % (512 - 3)
        assert _greedy_from_cache(model, _kv(model, one_off), tail) != right, \
            "KV with one wrong token gave the same output"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(arch="gpt"), "arch 'gpt' is not supported; choose one of llama, qwen2"),
    (dict(hidden=100, heads=3, kv_heads=1), "hidden (100) must divide by heads (3)"),
    (dict(hidden=64, heads=4, kv_heads=1), "head size multiple of 32"),
    (dict(heads=4, kv_heads=3), "heads by kv-heads (3)"),
    (dict(layers=0), "--layers must be at least 1, got 0"),
    (dict(vocab=100), "--vocab must be at least 300"),
])
def test_bad_arguments_messages_and_nothing_written(tmp_path, kwargs, needle):
    out = tmp_path / "refused"
    with pytest.raises(ValueError) as e:
        make_model(out, **kwargs)
    assert needle in str(e.value)
    assert not out.exists()


def test_defaults_are_valid_and_match_the_cli():
    import inspect

    from launch.cli import build_parser

    d = {k: p.default for k, p in inspect.signature(make_model).parameters.items() if k != "out"}
    assert d["arch"] in ("llama", "qwen2")
    assert d["hidden"] % d["heads"] == 0 and (d["hidden"] // d["heads"]) % 32 == 0
    assert d["heads"] % d["kv_heads"] == 0 and d["vocab"] >= 300
    args = build_parser(["make-model", "x"]).parse_args(["make-model", "x"])
    for k in ("arch", "layers", "hidden", "heads", "kv_heads", "vocab", "seed"):
        assert getattr(args, k) == d[k], k


def test_cli_bad_choice_exits_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "launch.cli", "make-model", str(tmp_path / "x"), "--arch", "gpt"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pd make-model: error: argument --arch: invalid choice")
    assert not (tmp_path / "x").exists()


def test_shaped_model_without_weights_and_with_random_weights(tmp_path, monkeypatch):
    """--shape: config of the named shape + tokenizer; --weights random: seeded safetensors shards
    that transformers loads (names and shapes right), norms 1, std as asked, prompt-dependent output."""
    import launch.model as m

    monkeypatch.setitem(m.SHAPES, "tiny-test", dict(arch="llama", layers=2, hidden=64, heads=2, kv_heads=1,
                                                    intermediate=96, vocab=512, max_position=256,
                                                    rope_theta=10000.0, dtype="float32", init_std=0.02))
    bare = m.make_shaped_model(tmp_path / "bare", "tiny-test", "none")
    cfg = json.loads((bare / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["intermediate_size"] == 96 and cfg["num_key_value_heads"] == 1
    assert cfg["vocab_size"] == 512 and cfg["torch_dtype"] == "float32"
    assert not list(bare.glob("*.safetensors")) and (bare / "tokenizer.json").is_file()
    d = m.make_shaped_model(tmp_path / "rand", "tiny-test", "random", seed=3, init_std=0.5)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    sd = model.state_dict()
    assert torch.all(sd["model.norm.weight"] == 1)
    assert 0.45 < float(sd["model.layers.1.mlp.up_proj.weight"].std()) < 0.55
    assert len({tuple(_greedy(model, [i, i + 1, i + 2], n=6)) for i in (5, 50, 100)}) == 3


def test_random_weights_do_not_depend_on_shard_size(tmp_path):
    from launch.model import write_random_weights

    cfg = dict(hidden_size=32, intermediate_size=48, vocab_size=300, num_attention_heads=2, num_key_value_heads=1,
               num_hidden_layers=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_random_weights(tmp_path / "a", cfg, 0, 0.02, "float32")
    write_random_weights(tmp_path / "b", cfg, 0, 0.02, "float32", shard_bytes=20_000)
    from safetensors.torch import load_file

    a = load_file(str(next((tmp_path / "a").glob("*.safetensors"))))
    b = {}
    for f in sorted((tmp_path / "b").glob("*.safetensors")):
        b.update(load_file(str(f)))
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
