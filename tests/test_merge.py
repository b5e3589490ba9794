"""r7b_fast.merge + r7b_fast._merge: output bytes against the numpy reference of
test_merge_helpers (fp32 fma chain, then round-to-nearest-even written in numpy), for every
dtype pair, odd sizes, 0-d tensors, different shard layouts, every SIMD path this CPU has and
several thread counts; HF layout; transformers round trip; mergekit YAML == CLI; mergekit itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_merge_helpers import (
    from_bits,
    random_values,
    read_raw,
    reference_merge,
    to_bf16_bits,
    write_model,
)

from r7b_fast import _merge
from r7b_fast.merge import MergeError, main, merge_checkpoints

# sizes that are not multiples of the 8/16-lane SIMD widths, a 0-d tensor, an empty one
SHAPES = {
    "t0": (0,),
    "t1": (1,),
    "t7": (7,),
    "t4097": (4097,),
    "s": (),
    "m": (3, 33),
    "w": (17, 65),
}
LAYOUTS = [None, [["t0", "t1", "t7"], ["t4097", "s", "m", "w"]], [["w"], ["m", "t1"], ["t0", "t7", "t4097", "s"]]]  # fmt: skip


def _f32(x):
    return float(np.float32(x))


def make_models(tmp: Path, n: int, dtype: str, seed=0, shapes=SHAPES, specials=False):
    """n models with different shard layouts; returns (paths, [name -> float32 values])."""
    rng = np.random.default_rng(seed)
    paths, values = [], []
    for k in range(n):
        t = {name: (dtype, random_values(rng, dtype, shape)) for name, shape in shapes.items()}
        if specials:  # F32 inputs: zeros, Inf, NaN, subnormals, fp16-overflowing values
            assert dtype == "F32"
            sp = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 6e4, 7e4, 1e30])
            t["w"][1].reshape(-1)[k : k + len(sp) * 50 : 50] = sp
        paths.append(
            write_model(
                tmp / f"m{k}", t, shards=LAYOUTS[k % len(LAYOUTS)] if shapes is SHAPES else None
            )
        )
        values.append({name: v for name, (_, v) in t.items()})
    return paths, values


def _st(dtype):
    return np.float32 if dtype == "F32" else np.uint16


def check_against_reference(out: Path, values, coefs, out_dtype, shapes=SHAPES):
    raw = read_raw(out)
    assert set(raw) == set(shapes)
    for name, shape in shapes.items():
        dt, shp, data = raw[name]
        assert (dt, shp) == (out_dtype, shape), name
        want = reference_merge([v[name] for v in values], coefs, out_dtype)
        assert data == want, f"{name}: bytes differ from the numpy reference"


@pytest.mark.parametrize("in_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_linear_bytes_equal_numpy_reference(tmp_path, in_dtype, out_dtype):
    paths, values = make_models(tmp_path, 3, in_dtype, seed=len(in_dtype) * 10 + len(out_dtype))
    w = [0.2, 0.3, 0.7]
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[out_dtype]
    s = merge_checkpoints(
        paths, tmp_path / "out", weights=w, dtype=name, chunk_bytes=256, progress=False
    )
    coefs = [_f32(x / sum(w)) for x in w]  # normalize (default for linear), then fp32
    assert list(s["coefficients"].values()) == coefs
    check_against_reference(tmp_path / "out", values, coefs, out_dtype)


def test_default_dtype_is_the_inputs_and_unnormalized_weights(tmp_path):
    paths, values = make_models(tmp_path, 2, "F16")
    seen = []
    merge_checkpoints(paths, tmp_path / "out", weights=[1.5, -0.25], normalize=False,
                      progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    check_against_reference(tmp_path / "out", values, [1.5, -0.25], "F16")
    total = sum(int(np.prod(s)) * 2 for s in SHAPES.values())
    assert seen and seen[-1] == (total, total) and seen == sorted(seen)  # polled, then final


def test_task_arithmetic_bytes(tmp_path):
    paths, values = make_models(tmp_path, 3, "BF16", seed=3)
    base, experts = paths[0], paths[1:]
    w = [0.7, -0.3]
    merge_checkpoints(experts, tmp_path / "out", weights=w, method="task_arithmetic", base=base,
                      chunk_bytes=128, progress=False)  # fmt: skip
    # base + sum w_i (x_i - base) == (1 - sum w) base + sum w_i x_i, base first
    coefs = [_f32(1 - sum(w)), _f32(0.7), _f32(-0.3)]
    check_against_reference(tmp_path / "out", values, coefs, "BF16")
    # normalize=True: w / sum(w) -> the base coefficient is exactly 0 and the base is not read
    s = merge_checkpoints(experts, tmp_path / "out2", weights=[1.0, 3.0], method="task_arithmetic",
                          base=base, normalize=True, progress=False)  # fmt: skip
    assert list(s["coefficients"].values()) == [0.25, 0.75]
    check_against_reference(tmp_path / "out2", values[1:], [0.25, 0.75], "BF16")


@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_every_simd_path_and_thread_count_identical(tmp_path, out_dtype, monkeypatch):
    paths, values = make_models(tmp_path, 3, "F32", seed=7, specials=True)
    paths_avail = _merge.available_simd()
    print("SIMD paths usable on this CPU:", paths_avail)
    outs = {}
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[out_dtype]
    for simd in paths_avail:
        for threads in (1, 2, 3):
            d = tmp_path / f"o-{simd}-{threads}"
            monkeypatch.setenv("R7B_MERGE_SIMD", simd)  # the env var forces the path
            s = merge_checkpoints(paths, d, weights=[1, 2, 3], dtype=name, threads=threads,
                                  chunk_bytes=64 * threads, progress=False)  # fmt: skip
            assert s["simd"] == simd
            outs[(simd, threads)] = read_raw(d)
    first = next(iter(outs.values()))
    assert all(o == first for o in outs.values())
    check_against_reference(tmp_path / "o-scalar-1", values, [_f32(k / 6) for k in (1, 2, 3)], out_dtype)  # fmt: skip
    w = from_bits(np.frombuffer(first["w"][2], _st(out_dtype)), out_dtype)
    assert np.isnan(w).any() and np.isinf(w).any()  # the specials reached the output


def test_forcing_an_unknown_simd_path_is_an_error(tmp_path, monkeypatch):
    paths, _ = make_models(tmp_path, 2, "F32", shapes={"a": (3,)})
    monkeypatch.setenv("R7B_MERGE_SIMD", "sse9")
    with pytest.raises(ValueError, match="R7B_MERGE_SIMD"):
        merge_checkpoints(paths, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hf_layout_sharding_index_and_tied_lm_head(tmp_path):
    rng = np.random.default_rng(5)
    shapes = {
        "model.embed_tokens.weight": (64, 16),
        "lm_head.weight": (64, 16),
        "model.norm.weight": (16,),
    }
    paths = []
    for k in range(2):
        t = {n: ("BF16", random_values(rng, "BF16", s)) for n, s in shapes.items()}
        d = write_model(tmp_path / f"m{k}", t,
                        config={"model_type": "x", "tie_word_embeddings": True, "dtype": "bfloat16"})  # fmt: skip
        paths.append(d)
    (paths[0] / "tokenizer.json").write_text("{}")
    (paths[0] / "README.md").write_text("not copied")
    s = merge_checkpoints(
        paths, tmp_path / "out", max_shard_size=2100, dtype="float32", progress=False
    )
    out = tmp_path / "out"
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(s["shards"])
    assert n == 2 and s["shards"] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in (1, 2)]
    raw = read_raw(out)
    assert "lm_head.weight" not in raw and set(idx["weight_map"]) == set(raw)
    assert idx["metadata"]["total_size"] == sum(len(r[2]) for r in raw.values()) == 64 * 16 * 4 + 64
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "tokenizer.json", *s["shards"],
                                                            "model.safetensors.index.json"])  # fmt: skip
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_non_floating_tensors_copied_and_checked(tmp_path):
    from test_merge_helpers import write_safetensors

    ids = np.arange(10, dtype=np.int64)
    for k in range(2):
        (tmp_path / f"m{k}").mkdir()
        write_safetensors(tmp_path / f"m{k}" / "model.safetensors",
                          {"ids": ("I64", (10,), ids.tobytes()), "x": ("F32", (2,), np.float32([k, 1]).tobytes()),
                           "mask": ("BOOL", (3,), bytes([1, 0, k == 5]))})  # fmt: skip
    merge_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "out", progress=False)
    raw = read_raw(tmp_path / "out")
    assert raw["ids"] == ("I64", (10,), ids.tobytes()) and raw["mask"][2] == bytes([1, 0, 0])
    write_safetensors(tmp_path / "m1" / "model.safetensors",
                      {"ids": ("I64", (10,), (ids + 1).tobytes()), "x": ("F32", (2,), bytes(8)),
                       "mask": ("BOOL", (3,), bytes([1, 0, 0]))})  # fmt: skip
    with pytest.raises(ValueError, match="non-floating tensor 'ids' differs"):
        merge_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_safetensors_and_transformers_load_merged_tiny_cohere2(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from transformers import Cohere2ForCausalLM

    from r7b_fast.model import build_model, tiny_config

    cfg = tiny_config(num_hidden_layers=2)
    sds = []
    for seed in (1, 2):
        m = build_model(cfg, torch.float32, seed=seed)
        m.save_pretrained(tmp_path / f"e{seed}")
        sds.append({k: v.numpy() for k, v in m.state_dict().items()})
    s = merge_checkpoints([tmp_path / "e1", tmp_path / "e2"], tmp_path / "out", progress=False)
    sd = load_file(tmp_path / "out" / s["shards"][0])
    assert "lm_head.weight" not in sd  # tied
    merged = Cohere2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ref = build_model(cfg, torch.float32, seed=0).eval()
    avg = {
        k: torch.from_numpy(sds[0][k] * np.float32(0.5) + sds[1][k] * np.float32(0.5))
        for k in sds[0]
    }
    ref.load_state_dict(avg)
    x = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(merged(x).logits, ref(x).logits)  # 0.5 a + 0.5 b rounds once either way


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mergekit_yaml_equals_cli(tmp_path):
    paths, _ = make_models(tmp_path, 3, "BF16", seed=11)
    y = _yaml(tmp_path / "m.yaml", f"""
merge_method: task_arithmetic
base_model: {paths[0]}
models:
  - model: {paths[1]}
    parameters: {{weight: 0.6}}
  - model: {paths[2]}
    parameters: {{weight: 0.5}}
dtype: float16
parameters: {{normalize: false}}
""")  # fmt: skip
    assert main(["--config", str(y), "--out", str(tmp_path / "a")]) == 0
    cli = ["--out", str(tmp_path / "b"), "--method", "task_arithmetic", "--base", str(paths[0]),
           "--model", f"{paths[1]}:0.6", "--model", f"{paths[2]}:0.5", "--dtype", "float16"]  # fmt: skip
    assert main(cli) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_mergekit_yaml_rejects_unknown_keys(tmp_path, capsys):
    paths, _ = make_models(tmp_path, 2, "BF16", shapes={"a": (3,)})
    for bad, key in [("tokenizer_source: base\n", "tokenizer_source"),
                     ("parameters: {normalize: true, int8_mask: true}\n", "parameters.int8_mask")]:  # fmt: skip
        y = _yaml(tmp_path / "m.yaml", f"merge_method: linear\nmodels:\n  - model: {paths[0]}\n"
                                       f"  - model: {paths[1]}\n    parameters: {{weight: 1, density: 0.5}}\n{bad}")  # fmt: skip
        with pytest.raises(MergeError, match=key.replace(".", r"\.") + "|models\\[1\\]"):
            from r7b_fast.merge import load_mergekit_yaml

            load_mergekit_yaml(y)
    y = _yaml(tmp_path / "m.yaml", f"merge_method: breadcrumbs\nmodels:\n  - model: {paths[0]}\n")
    assert main(["--config", str(y), "--out", str(tmp_path / "o")]) == 2
    assert "merge_method" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_mergekit_itself_agrees_within_bf16_rounding(tmp_path):
    """mergekit (peers extra) on the same YAML: it sums in fp32 and divides by sum(w) at the end
    (we multiply by w/sum(w)), so values may differ by rounding: allow 1 bf16 ulp."""
    exe = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("mergekit (the `peers` extra) is not installed")
    torch = pytest.importorskip("torch")
    from r7b_fast.model import build_model, tiny_config

    cfg = tiny_config(num_hidden_layers=1, vocab_size=256)
    for s in (1, 2, 3):
        build_model(cfg, torch.bfloat16, seed=s).save_pretrained(tmp_path / f"e{s}")
    y = _yaml(tmp_path / "m.yaml", "merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {tmp_path / f'e{s}'}\n    parameters: {{weight: {w}}}\n" for s, w in ((1, 0.2), (2, 0.5), (3, 0.3))))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([exe, str(y), str(tmp_path / "mk")], env=env,
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["--config", str(y), "--out", str(tmp_path / "ours")]) == 0
    ours, mk = read_raw(tmp_path / "ours"), read_raw(tmp_path / "mk")
    mk.pop("lm_head.weight", None)
    assert set(ours) == set(mk)
    for name in ours:
        a = from_bits(np.frombuffer(ours[name][2], np.uint16), "BF16")
        b = from_bits(np.frombuffer(mk[name][2], np.uint16), "BF16")
        ulp = np.abs(from_bits(to_bf16_bits(a).astype(np.uint16) + 1, "BF16") - a)
        assert np.all(np.abs(a - b) <= ulp), name


def test_cli_unweighted_models_share_what_the_weights_leave(tmp_path, capsys):
    """The README's `--model a --model b:0.3`: a gets 1 - 0.3 = 0.7; two unweighted models split
    what is left equally; the bytes equal the numpy reference of those coefficients."""
    paths, values = make_models(tmp_path, 3, "BF16", seed=21)
    out = tmp_path / "readme"
    assert main(["--out", str(out), "--model", str(paths[0]), "--model", f"{paths[1]}:0.3"]) == 0
    check_against_reference(out, values[:2], [_f32(0.7), _f32(0.3)], "BF16")
    out3 = tmp_path / "three"
    argv = ["--out", str(out3), "--model", f"{paths[0]}:0.5", "--model", str(paths[1]),
            "--model", str(paths[2]), "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    check_against_reference(out3, values, [_f32(0.5), _f32(0.25), _f32(0.25)], "F32")
    # all weighted and none weighted keep their meaning (as given; 1 each)
    assert main(["--out", str(tmp_path / "none"), "--model", str(paths[0]),
                 "--model", str(paths[1])]) == 0  # fmt: skip
    check_against_reference(tmp_path / "none", values[:2], [0.5, 0.5], "BF16")


@pytest.mark.parametrize("given", [["1"], ["0.6", "0.4"], ["0.7", "0.5"], ["nan"]])
def test_cli_unweighted_model_with_nothing_left_is_refused(tmp_path, capsys, given):
    """Weights summing to >= 1 (or NaN) leave the unweighted model a weight <= 0: exit 2, the
    message names the sum, nothing is written."""
    paths, _ = make_models(tmp_path, len(given) + 1, "BF16", shapes={"a": (3,)})
    argv = ["--out", str(tmp_path / "o"), "--model", str(paths[-1])]
    argv += [a for p, w in zip(paths, given) for a in ("--model", f"{p}:{w}")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "leaves nothing" in capsys.readouterr().err and not (tmp_path / "o").exists()
