"""TIES / DARE / SLERP (r7b_fast.merge_plan.method_plan): output bytes against numpy references
written here from the documented semantics (top-k by a stable sort instead of nth_element +
tie cut, DARE draws from a vectorised uint64 hash, SLERP sums by np.cumsum and its angle by
Python's math), for every SIMD path and thread count and a 64-byte chunk (so thresholds, ties
and rows cross chunk boundaries); the YAML keys and their errors; mergekit itself (slow)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_merge_helpers import encode, fma32, from_bits, random_values, read_raw, write_model

from r7b_fast import _merge
from r7b_fast.merge import MergeError, dare_key, load_mergekit_yaml, main, merge_checkpoints

SIMD = _merge.available_simd()
SHAPES = {"m": (6, 37), "v": (41,), "s": (), "e": (0, 3), "r": (3, 1)}
GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dare_keep(key: int, n: int, density: float) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    draw = _mix64(np.uint64(key) + (i + np.uint64(1)) * GOLD) >> np.uint64(40)
    return draw.astype(np.float64) < density * 2.0**24


def topk_keep(tau: np.ndarray, density: float) -> np.ndarray:
    """The k largest |tau| (NaN largest), ties by lower index: a stable sort, not nth_element."""
    if density >= 1:
        return np.ones(tau.size, bool)
    k = max(1, int(density * tau.size))
    m = np.where(np.isnan(tau), np.float32(np.inf), np.abs(tau))
    order = np.lexsort((np.arange(tau.size), -m.astype(np.float64)))
    keep = np.zeros(tau.size, bool)
    keep[order[:k]] = True
    return keep


def ref_gta(method, xs, w, dens, name, seed=0, normalize=None, rescale=None) -> np.ndarray:
    """fp32 values of a ties / dare_* merge of flat arrays xs (base first)."""
    sparsify = "magnitude" if method == "ties" else "random"
    consensus = method != "dare_linear"
    normalize = (method == "ties") if normalize is None else normalize
    rescale = (method != "ties") if rescale is None else rescale
    base, f32 = xs[0], np.float32
    wt = []
    with np.errstate(all="ignore"):
        for j, x in enumerate(xs[1:], start=1):
            tau = (x - base).astype(f32)
            if tau.size == 0 or dens[j - 1] >= 1:
                keep = np.ones(tau.size, bool)
            elif sparsify == "magnitude":
                keep = topk_keep(tau, dens[j - 1])
            else:
                keep = dare_keep(dare_key(seed, name, j), tau.size, dens[j - 1])
            kept = np.where(keep, tau, f32(0))
            if rescale and tau.size:
                before = np.cumsum(np.abs(tau).astype(np.float64))[-1]
                after = np.cumsum(np.abs(kept).astype(np.float64))[-1]
                if before >= 1e-7 and after >= 1e-7:
                    kept = (kept * f32(before / after)).astype(f32)
            wt.append((f32(w[j - 1]) * kept).astype(f32))
        mixed = np.zeros(base.shape, f32)
        if consensus:
            s = np.zeros(base.shape, f32)
            for v in wt:
                s = (s + v).astype(f32)
            up, div = s >= 0, np.zeros(base.shape, f32)
            for v, wj in zip(wt, w):
                agree = np.where(up, v > 0, v < 0)
                mixed = np.where(agree, mixed + v, mixed).astype(f32)
                div = np.where(agree, div + f32(wj), div).astype(f32)
            if normalize:
                mixed = (mixed / np.where(div == 0, f32(1), div)).astype(f32)
        else:
            for v in wt:
                mixed = (mixed + v).astype(f32)
            tot = sum(w)
            if normalize and abs(tot) >= 1e-8:
                mixed = (mixed / f32(tot)).astype(f32)
        return (base + mixed).astype(f32)


def slerp_coefs(sxx, syy, sxy, t):
    na, nb = math.sqrt(sxx), math.sqrt(syy)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = min(1.0, max(-1.0, sxy / (na * nb)))
    if abs(dot) > 0.9995:
        return np.float32(1 - t), np.float32(t)
    th = math.acos(dot)
    return np.float32(math.sin((1 - t) * th) / math.sin(th)), np.float32(
        math.sin(t * th) / math.sin(th)
    )


def ref_slerp(x, y, t) -> np.ndarray:
    rows = 1  # one angle per tensor
    a = x.reshape(rows, -1).astype(np.float64)
    b = y.reshape(rows, -1).astype(np.float64)
    if a.size == 0:
        return x.astype(np.float32)
    sums = [np.cumsum(p, axis=1)[:, -1] for p in (a * a, b * b, a * b)]
    c = np.array([slerp_coefs(*(s[r] for s in sums), t) for r in range(rows)], np.float32)
    with np.errstate(all="ignore"):
        acc = (c[:, :1] * x.reshape(rows, -1)).astype(np.float32)
    return fma32(c[:, 1:], y.reshape(rows, -1), acc).reshape(x.shape)


def out_bytes(v: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return (
            np.where(np.isnan(v), np.uint32(0x7FC00000).view(np.float32), v)
            .astype(np.float32)
            .tobytes()
        )
    return encode(v, dtype)


def exact(v: np.ndarray, dtype: str) -> np.ndarray:
    """v rounded to `dtype` (what the file holds), as float32."""
    raw = np.frombuffer(encode(v, dtype), np.float32 if dtype == "F32" else np.uint16)
    return from_bits(raw, dtype).reshape(v.shape)


def make(tmp: Path, n: int, dtype: str, seed=0, scale=1.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    paths, values = [], []
    for k in range(n):
        t = {nm: random_values(rng, dtype, sh, scale if k else 1.0) for nm, sh in shapes.items()}
        if k and "m" in t:  # exact magnitude ties straddling the threshold
            t["m"].reshape(-1)[::5] = values[0]["m"].reshape(-1)[::5] + np.float32(0.5)
            t["m"] = exact(t["m"], dtype)
        shards = [["m", "s"], ["v", "e", "r"]] if k % 2 and shapes is SHAPES else None
        paths.append(write_model(tmp / f"m{k}", {nm: (dtype, v) for nm, v in t.items()}, shards))
        values.append(t)
    return paths, values


def check(out: Path, want: dict[str, np.ndarray], dtype: str):
    raw = read_raw(out)
    assert set(raw) == set(want)
    for name, v in want.items():
        assert raw[name][1] == v.shape and raw[name][0] == dtype
        assert raw[name][2] == out_bytes(v, dtype), f"{name}: bytes differ from the reference"


CASES = [
    ("ties", dict(density=0.3), {}),
    ("ties", dict(density=[0.5, 1.0, 0.2], weights=[1.0, 0.7, -0.4], normalize=False), {}),
    ("ties", dict(density=0.6, weights=[0.9, 0.3, 0.5], rescale=True), {}),
    ("dare_linear", dict(density=0.5, seed=7), {}),
    (
        "dare_linear",
        dict(
            density=[0.3, 0.9, 0.6],
            weights=[0.5, 0.3, 0.2],
            normalize=True,
            rescale=False,
            seed=2**64 - 1,
        ),
        {},
    ),  # fmt: skip
    ("dare_ties", dict(density=0.4, weights=[1.0, -0.5, 0.8], seed=11), {}),
]


@pytest.mark.parametrize("in_dtype,out_dtype", [("BF16", "BF16"), ("F32", "F32"), ("F16", "BF16")])
@pytest.mark.parametrize("method,kw,_", CASES)
def test_gta_bytes_equal_numpy_reference(tmp_path, method, kw, _, in_dtype, out_dtype):
    paths, values = make(tmp_path, 4, in_dtype, seed=len(str(kw)), scale=0.1)
    merge_checkpoints(paths[1:], tmp_path / "o", method=method, base=paths[0], dtype=out_dtype,
                      progress=False, **kw)  # fmt: skip
    n = len(paths) - 1
    w = kw.get("weights", [1.0] * n)
    d = kw["density"] if isinstance(kw["density"], list) else [kw["density"]] * n
    want = {
        name: ref_gta(method, [v[name].reshape(-1) for v in values], w, d, name, kw.get("seed", 0),
                      kw.get("normalize"), kw.get("rescale")).reshape(values[0][name].shape)
        for name in SHAPES
    }  # fmt: skip
    check(tmp_path / "o", want, out_dtype)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_slerp_bytes_equal_numpy_reference(tmp_path, t, dtype):
    paths, values = make(tmp_path, 2, dtype, seed=5)
    values[1]["v"] = exact(values[0]["v"] * np.float32(2), dtype)  # colinear: lerp
    values[1]["r"] = -values[0]["r"]  # antipodal: lerp
    values[0]["s"] = np.zeros((), np.float32)  # zero: norm read as 1, theta = pi/2
    for k in range(2):  # rewritten as single files
        shutil.rmtree(paths[k])
        write_model(paths[k], {nm: (dtype, v) for nm, v in values[k].items()})
    merge_checkpoints(paths, tmp_path / "o", method="slerp", base=paths[0], t=t, progress=False)
    want = {nm: ref_slerp(values[0][nm], values[1][nm], t) for nm in SHAPES}
    check(tmp_path / "o", want, dtype)
    if t == 0.0:  # t = 0 is the base, t = 1 the other model (row coefficients exactly 1 and 0)
        assert read_raw(tmp_path / "o")["m"][2] == read_raw(paths[0])["m"][2]
    if t == 0.3:  # the zero base: sin(0.3 pi/2) * other, not the lerp 0.3 * other
        assert want["s"] == np.float32(math.sin(0.3 * math.pi / 2)) * values[1]["s"]


@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.3)), ("dare_ties", dict(density=0.5)),
                                       ("slerp", dict(t=0.4))])  # fmt: skip
def test_identical_bytes_across_simd_threads_and_chunks(tmp_path, method, kw):
    paths, _ = make(tmp_path, 3 if method != "slerp" else 2, "BF16", seed=3)
    outs = []
    for simd in SIMD:
        for threads, chunk in ((1, 64), (3, 64), (2, 2 << 20)):
            o = tmp_path / f"o-{simd}-{threads}-{chunk}"
            merge_checkpoints(paths[1:] if method != "slerp" else paths, o, method=method,
                              base=paths[0], simd=simd, threads=threads, chunk_bytes=chunk,
                              progress=False, **kw)  # fmt: skip
            outs.append(read_raw(o))
    assert all(o == outs[0] for o in outs[1:])


def test_dare_seed_reproducible_and_drop_rate(tmp_path):
    paths, values = make(tmp_path, 2, "F32", shapes={"a": (200, 100)}, seed=9)
    runs = {}
    for seed in (1, 1, 2):
        o = tmp_path / f"o{len(runs)}"
        merge_checkpoints(paths[1:], o, method="dare_linear", base=paths[0], density=0.3,
                          rescale=False, seed=seed, progress=False)  # fmt: skip
        runs[len(runs)] = np.frombuffer(read_raw(o)["a"][2], np.float32)
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    kept = runs[0] != values[0]["a"].reshape(-1)  # kept elements moved off the base
    assert abs(kept.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / kept.size)  # 4 sigma


@pytest.mark.parametrize("kw,match", [
    (dict(method="ties"), "needs a base model"),
    (dict(method="ties", base=0, density=0.0), r"density must be in \(0, 1\]"),
    (dict(method="ties", base=0, density=1.5), r"density must be in \(0, 1\]"),
    (dict(method="ties", base=0, density=[0.5]), "density: got 1 for 2 models"),
    (dict(method="ties", base=0, density="0.5"), "density must be a finite number"),
    (dict(method="dare_ties", base=0, weights=[1.0, float("nan")]), "weights must be a list of finite"),
    (dict(method="dare_linear", base=0, seed=-1), "seed must be an integer"),
    (dict(method="dare_linear", base=0, seed=True), "seed must be an integer"),
    (dict(method="ties", base=0, t=0.5), "t applies to slerp only"),
    (dict(method="ties", base=0, rescale="yes"), "rescale must be true or false"),
    (dict(method="slerp", base=0), "slerp needs t"),
    (dict(method="slerp", base=0, t=1.5), r"t must be in \[0, 1\]"),
    (dict(method="slerp", base=0, t=0.5, weights=[1, 1]), "weights does not apply to slerp"),
    (dict(method="slerp", base=0, t=0.5, density=0.5), "density does not apply to slerp"),
    (dict(method="slerp", base=0, t=0.5, extra=True), "slerp merges the base with exactly one"),
    (dict(method="linear", density=0.5), "density does not apply to linear"),
    (dict(method="task_arithmetic", base=0, t=0.5), "t does not apply to task_arithmetic"),
])  # fmt: skip
def test_parameter_errors_leave_nothing(tmp_path, kw, match):
    paths, _ = make(tmp_path, 3 if kw.pop("extra", False) else 2, "BF16", shapes={"a": (4,)})
    if "base" in kw:
        kw["base"] = paths[kw["base"]]
    with pytest.raises(MergeError, match=match):
        merge_checkpoints(paths, tmp_path / "o", progress=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def _yaml(tmp: Path, text: str) -> Path:
    (tmp / "m.yaml").write_text(text)
    return tmp / "m.yaml"


def test_yaml_methods_equal_the_api(tmp_path):
    paths, _ = make(tmp_path, 3, "BF16", seed=4)
    y = _yaml(tmp_path, f"""merge_method: dare_ties
base_model: {paths[0]}
models:
  - model: {paths[0]}
  - model: {paths[1]}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {paths[2]}
    parameters: {{weight: 0.5}}
parameters: {{density: 0.8, seed: 5, normalize: true, rescale: false}}
dtype: float32
""")  # fmt: skip
    assert main(["--config", str(y), "--out", str(tmp_path / "a")]) == 0
    merge_checkpoints(paths[1:], tmp_path / "b", method="dare_ties", base=paths[0],
                      weights=[0.7, 0.5], density=[0.4, 0.8], seed=5, normalize=True,
                      rescale=False, dtype="float32", progress=False)  # fmt: skip
    assert read_raw(tmp_path / "a") == read_raw(tmp_path / "b")
    y = _yaml(tmp_path, f"merge_method: slerp\nbase_model: {paths[0]}\nmodels:\n"
                        f"  - model: {paths[0]}\n  - model: {paths[1]}\nparameters: {{t: 0.25}}\n")  # fmt: skip
    assert load_mergekit_yaml(y) == dict(models=[str(paths[0]), str(paths[1])], method="slerp",
                                         base=str(paths[0]), dtype=None, t=0.25)  # fmt: skip
    assert main(["--config", str(y), "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("body,match", [
    ("merge_method: ties\nmodels: [{model: A, parameters: {weight: 1, t: 0.5}}]\n",
     r"unsupported key models\[0\]\.parameters\.t"),
    ("merge_method: slerp\nmodels: [{model: A, parameters: {weight: 1}}]\n",
     r"unsupported key models\[0\]\.parameters\.weight"),
    ("merge_method: ties\nmodels: [{model: A}]\nparameters: {lambda: 0.5}\n",
     r"unsupported key parameters\.lambda"),
    ("merge_method: ties\nmodels: [{model: A}]\nparameters: {int8_mask: true}\n",
     r"unsupported key parameters\.int8_mask"),
    ("merge_method: ties\nmodels: [{model: A, parameters: {density: high}}]\n",
     r"models\[0\]\.parameters\.density must be a number"),
    ("merge_method: ties\nmodels: [{model: A}]\nparameters: {normalize: 1}\n",
     r"parameters\.normalize must be true or false"),
    ("merge_method: breadcrumbs\nmodels: [{model: A}]\n", "merge_method must be one of"),
    ("merge_method: ties\nmodels: [{model: A}]\nbase_model: [A]\n", "base_model must be a path"),
    ("merge_method: ties\nmodels: {model: A}\n", "models must be a non-empty list"),
    ("merge_method: ties\nmodels: [A]\n", r"models\[0\] must be a mapping"),
    ("- merge_method\n", "the document must be a mapping"),
    ("merge_method: ties\nmodels: [{model: A}\n", "cannot read YAML"),
])  # fmt: skip
def test_malformed_yaml_is_a_merge_error(tmp_path, body, match):
    with pytest.raises(MergeError, match=match):
        load_mergekit_yaml(_yaml(tmp_path, body))


def _mergekit(tmp: Path, text: str, out: Path) -> None:
    exe = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("mergekit (the `peers` extra) is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([exe, str(_yaml(tmp, text)), str(out)], env=env, capture_output=True,
                       text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


def _tiny_models(tmp: Path, n: int) -> list[Path]:
    """A tiny Cohere2 base (fp32) and n - 1 experts = base + small noise (fp32 task vectors:
    exact |tau| ties at a threshold, where mergekit's torch.argsort order is arbitrary, are
    vanishingly rare and the inputs are fixed)."""
    torch = pytest.importorskip("torch")
    from r7b_fast.model import build_model, tiny_config

    cfg = tiny_config(num_hidden_layers=1, vocab_size=256)
    paths = []
    for s in range(n):
        m = build_model(cfg, torch.float32, seed=1)
        g = torch.Generator().manual_seed(100 + s)
        with torch.no_grad():
            for p in m.parameters():
                if s:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        m.save_pretrained(tmp / f"e{s}")
        paths.append(tmp / f"e{s}")
    return paths


def _f32(raw: dict) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(v[2], np.float32) for k, v in raw.items() if k != "lm_head.weight"}


def _bf16_close(ours: dict, mk: dict) -> None:
    """Equal after rounding both fp32 results to bf16, within 1 bf16 ulp: the engine fuses
    and orders fp32 operations differently from torch (and SLERP's angle is fp64 here, fp32
    in mergekit), so results can straddle a bf16 rounding boundary."""
    assert set(ours) == set(mk)
    for name in ours:
        a = from_bits(np.frombuffer(encode(ours[name], "BF16"), np.uint16), "BF16")
        b = from_bits(np.frombuffer(encode(mk[name], "BF16"), np.uint16), "BF16")
        ulp = np.abs(from_bits(np.frombuffer(encode(a, "BF16"), np.uint16) + 1, "BF16") - a)
        assert np.all(np.abs(a - b) <= ulp), name


def _yaml_models(paths, params) -> str:
    return "".join(
        f"  - model: {p}\n    parameters: {{{params[k]}}}\n" for k, p in enumerate(paths)
    )


@pytest.mark.slow
def test_mergekit_agrees_ties_slerp_and_dare_density_1(tmp_path):
    """ties (density 0.4 / 0.7, normalize), slerp (t 0.3) and dare_linear at density 1 (no
    draw: mergekit's torch RNG is not ours) against mergekit-yaml 0.1.5 on a tiny Cohere2."""
    p = _tiny_models(tmp_path, 3)
    head = f"dtype: float32\nbase_model: {p[0]}\nmodels:\n"
    configs = {
        "ties": head + _yaml_models(p[1:], ["weight: 0.6, density: 0.4", "weight: 0.5, density: 0.7"]),
        "slerp": f"merge_method: slerp\n{head}  - model: {p[0]}\n  - model: {p[1]}\n"
                 "parameters: {t: 0.3}\n",
        "dare_linear": head + _yaml_models(p[1:], ["weight: 0.6, density: 1.0", "weight: 0.5"]),
    }  # fmt: skip
    for method, text in configs.items():
        if not text.startswith("merge_method"):
            text = f"merge_method: {method}\n" + text
        _mergekit(tmp_path, text, tmp_path / f"mk-{method}")
        assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / method)]) == 0
        _bf16_close(_f32(read_raw(tmp_path / method)), _f32(read_raw(tmp_path / f"mk-{method}")))


@pytest.mark.slow
def test_mergekit_dare_statistically(tmp_path):
    """dare_linear / dare_ties at density 0.5 with L1 rescale: different RNGs, so compare what
    both must satisfy: about half of the task vector survives (4 sigma), and the L1 rescale makes
    sum |out - base| equal sum |tau| (one expert, weight 1) to 1e-3 in both."""
    p = _tiny_models(tmp_path, 2)
    base = _f32(read_raw(p[0]))
    tau = {k: v - base[k] for k, v in _f32(read_raw(p[1])).items()}
    for method in ("dare_linear", "dare_ties"):
        text = f"merge_method: {method}\ndtype: float32\nbase_model: {p[0]}\nmodels:\n" + \
            _yaml_models(p[1:], ["weight: 1.0, density: 0.5"])  # fmt: skip
        _mergekit(tmp_path, text, tmp_path / f"mk-{method}")
        assert main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / method)]) == 0
        for out in (tmp_path / method, tmp_path / f"mk-{method}"):
            got = _f32(read_raw(out))
            moved = np.concatenate([got[k] != base[k] for k in tau])
            n = moved.size
            assert abs(moved.mean() - 0.5) < 4 * math.sqrt(0.25 / n), (out, moved.mean())
            for k in tau:
                if tau[k].size > 1000:
                    l1 = np.abs(got[k].astype(np.float64) - base[k]).sum()
                    assert l1 == pytest.approx(np.abs(tau[k].astype(np.float64)).sum(), rel=1e-3), (
                        out,
                        k,
                    )


def _pipeline_yaml(tmp: Path, dpo_experts: bool = False, **merges) -> Path:
    """pipeline_demo with these `<section>.merge`s; its dpo section in the single form (one DPO
    model merged with its start, the base of ties/slerp) unless `dpo_experts` (the demo's two
    preference experts merged without the start)."""
    import yaml

    from r7b_fast.pipeline_spec import resolve_pipeline

    spec = yaml.safe_load(resolve_pipeline("pipeline_demo").read_text())
    if not dpo_experts:
        spec["dpo"] = {"config": spec["dpo"]["config"], "families": ["arith_ar", "arith_en"],
                       "merge_weights": [0.5, 0.5]}  # fmt: skip
    for sec, m in merges.items():
        spec[sec]["merge"] = m
    (tmp / "p.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "p.yaml"


def test_pipeline_stages_carry_method_params_and_base(tmp_path):
    from r7b_fast.pipeline_spec import build_stages, load_pipeline

    plain = {s.name: s for s in build_stages(load_pipeline(str(_pipeline_yaml(tmp_path))))}
    y = _pipeline_yaml(tmp_path, sft={"method": "ties", "density": 0.5},
                       dpo={"method": "slerp", "t": 0.3},
                       online_dpo={"method": "dare_linear", "density": [0.4, 0.9], "seed": 3})  # fmt: skip
    st = {s.name: s for s in build_stages(load_pipeline(str(y)))}
    sft = st["sft_merge"]
    base = next(d for d in sft.deps if d not in sft.spec["models"])  # the experts' start model
    assert sft.spec == {**plain["sft_merge"].spec, "method": "ties", "params": {"density": 0.5},
                        "base": base}  # fmt: skip
    assert st["sft_merge_perf"].spec["method"] == "ties" and base in st["sft_merge_perf"].deps
    assert st["dpo_merge"].spec["base"] == st["dpo_merge"].spec["models"][1]
    assert st["online_merge"].spec["params"] == {"density": [0.4, 0.9], "seed": 3}
    assert "method" not in plain["sft_merge"].spec  # linear merges: spec (and hash) unchanged
    # preference experts merged without their start: the start (the SFT merge) is the base
    y = _pipeline_yaml(tmp_path, dpo_experts=True, dpo={"method": "ties", "density": 0.5})
    merge = {s.name: s for s in build_stages(load_pipeline(str(y)))}["dpo_merge"]
    assert merge.spec["models"] == ["dpo_math", "dpo_skills"]
    assert merge.spec["base"] == "sft_merge" and "sft_merge" in merge.deps


@pytest.mark.parametrize("sec,merge,match", [
    ("sft", {"method": "breadcrumbs"}, r"sft\.merge\.method: must be one of"),
    ("sft", {"method": "ties", "density": 0}, r"sft\.merge: density must be in \(0, 1\]"),
    ("sft", {"method": "ties", "lambda": 1}, r"sft\.merge: unknown keys \['lambda'\]"),
    ("sft", {"method": "slerp", "t": 0.5}, r"sft\.merge: slerp merges the base with exactly one"),
    ("dpo", {"method": "slerp"}, r"dpo\.merge: slerp needs t"),
    ("dpo", {"method": "linear", "density": 0.5}, r"dpo\.merge: linear takes only `normalize`"),
    ("online_dpo", {"method": "dare_ties", "seed": -1}, r"online_dpo\.merge: seed must be"),
    ("online_dpo", {"method": "dare_ties", "density": [0.5]}, r"density: got 1 for 2 models"),
])  # fmt: skip
def test_pipeline_rejects_bad_merge_sections(tmp_path, sec, merge, match):
    from r7b_fast.pipeline_spec import PipelineError, load_pipeline

    with pytest.raises(PipelineError, match=match):
        load_pipeline(str(_pipeline_yaml(tmp_path, **{sec: merge})))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("slerp", {"t": 0.7})])
def test_pipeline_merge_stage_passes_method_through(tmp_path, method, params):
    """run_merge with a ties / slerp stage writes exactly what merge_checkpoints writes."""
    from r7b_fast.pipeline import Context, run_merge
    from r7b_fast.pipeline_spec import Stage

    work = tmp_path / "work"
    models = {}
    for k, name in enumerate(["gen", "dpo"]):
        d = work / name / "hf"
        d.parent.mkdir(parents=True)
        models[name] = make(d.parent / "tmp", 1, "BF16", seed=k)[0][0].rename(d)
    spec = {"models": ["dpo", "gen"], "weights": [0.5, 0.5], "method": method, "params": params,
            "base": "gen"}  # fmt: skip
    out = run_merge(Stage("m", "merge", ["dpo", "gen"], spec), tmp_path / "m",
                    Context(spec={}, work=work, stages={}))  # fmt: skip
    assert out["method"] == method and out["params"] == params and out["base"] == "gen"
    weights = None if method == "slerp" else [0.5, 0.5]
    merge_checkpoints([models["dpo"], models["gen"]], tmp_path / "direct", method=method,
                      base=models["gen"], weights=weights, progress=False, **params)  # fmt: skip
    assert read_raw(tmp_path / "m" / "hf") == read_raw(tmp_path / "direct")


RSS_CHILD = """
import sys
from r7b_fast.merge import merge_checkpoints
merge_checkpoints(sys.argv[2:4], sys.argv[4], base=sys.argv[1], method="ties", density=0.3,
                  threads=2, progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(int(hwm.split()[1]) // 1024)
"""


@pytest.mark.slow
def test_ties_memory_is_one_tensor_not_the_model(tmp_path):
    """3 models of two 12M-element bf16 tensors (24 MB each, 144 MB in all): the trim holds one
    fp32 |tau| copy of one tensor (48 MB, shared by the 2 threads) + 2 * 2 * 4 * 2 MiB of
    buffers (32 MiB) + the interpreter (~35 MiB); a tensor-at-a-time merge in fp32 would hold
    3 x 48 MB for one tensor, two threads 288 MB."""
    n = 12_000_000
    m = [write_model(tmp_path / f"m{k}", {"a": ("BF16", np.full(n, k, np.float32)),
                                          "b": ("BF16", np.full(n, -k, np.float32))})
         for k in range(3)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, *map(str, m), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.split()[-1])
    assert peak_mib < 140, f"peak RSS {peak_mib} MiB"
    raw = read_raw(tmp_path / "out")
    # every |tau| ties (1 or 2 for a, the same for b): the first 30% by index are kept
    a = from_bits(np.frombuffer(raw["a"][2], np.uint16), "BF16")
    k = int(0.3 * n)
    assert np.all(a[:k] == 1.5) and np.all(a[k:] == 0)  # (1 + 2) / 2 where both kept


def test_engine_method_tasks_check_arguments_and_name_files(tmp_path):
    """The engine's own checks of a method tuple, and an I/O failure in the per-tensor pass
    (before any chunk is written) naming the file."""
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(bytes(64))
    dst.write_bytes(b"")

    def task(numel=16, offs=(0, 0), method=None):
        m = method or (_merge.GTA, _merge.MAGNITUDE, True, False, True, 1.0, [1.0, 0.5], [], 1, 0.0)
        return ("x", _merge.MERGE, 0, 0, _merge.F32, numel, [0, 0], list(offs), _merge.F32,
                [0.0, 1.0], m)  # fmt: skip

    bad = [
        ((_merge.GTA, _merge.MAGNITUDE, True, False, True, 1.0, [1.0, 0.0], [], 1, 0.0), "density"),
        ((_merge.GTA, _merge.RANDOM, True, False, True, 1.0, [1.0, 0.5], [], 1, 0.0), "DARE key"),
        ((_merge.GTA, 7, True, False, True, 1.0, [1.0, 0.5], [], 1, 0.0), "bad sparsify"),
        ((_merge.SLERP, 0, False, False, False, 1.0, [1.0, 1.0], [], 1, 1.5), "t must be"),
        ((_merge.SLERP, 0, False, False, False, 1.0, [1.0, 1.0], [], 3, 0.5), "bad row count"),
        ((9, 0, False, False, False, 1.0, [1.0, 1.0], [], 1, 0.5), "bad method"),
    ]
    for m, match in bad:
        with pytest.raises(ValueError, match=match):
            _merge.Engine([str(src)], [str(dst)], [task(method=m)])
    with pytest.raises(OSError, match="unexpected end of file in '.*in.bin'"):
        _merge.Engine([str(src)], [str(dst)], [task(offs=(0, 32))]).run()  # 2nd source short
    assert dst.read_bytes() == b""  # the per-tensor pass failed before any chunk was written
