"""On-policy sampling for speed: StaticCache vs DynamicCache (same tokens, bounded sliding
layers), the batching's padding counters, the backend registry (hf, vllm, module:function) and
FSDP2 parameters gathered once per sampling phase (2 gloo ranks)."""

import sys

import pytest
import torch
from _train_helpers import one_thread_module, run_two_ranks  # noqa: F401 (autouse fixture)

from r7b_fast import generate as gen
from r7b_fast import sampling
from r7b_fast.generate import generate, padding_stats
from r7b_fast.model import END_OF_TURN_ID, build_model, tiny_config
from r7b_fast.sampling import HFBackend, VLLMBackend, get_backend

WINDOW, MAX_NEW = 8, 10
LENGTHS = (3, 14, 9, 1, 20, 6, 11)


def _model(window=WINDOW):
    # initializer_range 0.3: the random model's choices vary from step to step (see test_generate)
    return build_model(tiny_config(initializer_range=0.3, sliding_window=window), seed=0)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(8, 1024, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=5)])
def test_static_cache_gives_the_dynamic_cache_tokens(model, prompts, kw):
    """fp32, window 8 < prompt + new tokens (up to 30): the sliding layers evict keys in both
    caches. batch_size 4 over 14 rows: batches of widths 20, 11, 6 and a last one of 2 rows reuse
    the static caches (two, of 4 and 2 rows). Same weights and math order per row: equal ids."""
    run = dict(max_new_tokens=MAX_NEW, num_samples=2, batch_size=4, **kw)
    static = generate(model, None, prompts, cache="static", **run)
    assert static == generate(model, None, prompts, cache="dynamic", **run)
    assert static == generate(model, None, prompts, cache="static", **{**run, "batch_size": 1})
    # the window matters here: the same weights with a window covering everything differ
    wide = generate(_model(window=1024), None, prompts, cache="static", **run)
    assert wide != static
    distinct = len(LENGTHS) * (2 if kw["temperature"] > 0 else 1)  # greedy: samples equal
    assert len({tuple(c) for per in static for c in per}) == distinct  # non-trivial ids


def test_static_cache_layers_are_bounded_and_reused(model, prompts):
    caches = gen._Caches(model, "static", 30)
    a = caches.get(2)
    ids, mask = gen._left_pad(prompts[:2], 0, "cpu")
    with torch.no_grad():
        gen.prefill(model, ids, mask, a, gen._cache_kwarg(model))
    sizes = [(layer.is_sliding, tuple(layer.keys.shape)) for layer in a.layers]
    kv, hd = model.config.num_key_value_heads, model.config.head_dim
    want = [(t == "sliding_attention", (2, kv, WINDOW if t == "sliding_attention" else 30, hd))
            for t in model.config.layer_types]  # fmt: skip
    assert sizes == want and sum(s for s, _ in sizes) == 3
    assert caches.get(2) is a and int(a.layers[-1].cumulative_length) == 0  # reset, reused
    assert caches.get(3) is not a
    assert gen._Caches(model, "dynamic", 30).get(2) is not gen._Caches(model, "dynamic", 30).get(2)
    with pytest.raises(ValueError, match="cache"):
        generate(model, None, prompts, max_new_tokens=2, cache="paged")


def test_padding_counters_match_the_batches(model, prompts):
    """Rows sorted by prompt length, cut into batches of 3: the left padding of each batch is
    sum(width - length); decoded slots = rows x steps per batch."""
    stats = {}
    out = generate(model, None, prompts, max_new_tokens=MAX_NEW, num_samples=2, batch_size=3,
                   temperature=1.0, seed=1, stats=stats)  # fmt: skip
    rows = sorted([n for n in LENGTHS for _ in range(2)], reverse=True)
    batches = [rows[b : b + 3] for b in range(0, len(rows), 3)]
    assert stats["padding_tokens"] == sum(max(b) * len(b) - sum(b) for b in batches)
    assert stats["prompt_tokens"] == 2 * sum(LENGTHS) and stats["batches"] == len(batches)
    assert stats["new_tokens"] == sum(len(c) for per in out for c in per)
    assert stats["row_steps"] >= stats["new_tokens"] and stats["decode_steps"] <= 5 * MAX_NEW
    frac = padding_stats(stats)
    pad = stats["padding_tokens"] / (stats["padding_tokens"] + stats["prompt_tokens"])
    assert frac["frac_prompt_padding"] == pytest.approx(pad) and 0 < pad < 0.5
    assert 0 <= frac["frac_decode_idle"] < 1


FAKE_BACKENDS = """
class Reverse:
    '''Sample j of prompt p: token 100 + len(p) % 50, j + 1 times (at most max_new_tokens).'''
    def __init__(self, model, tokenizer, **options):
        self.options, self.calls = options, []

    def sample(self, prompt_ids, k, max_new_tokens, temperature, top_p, seed, stop_ids,
               prompt_keys=None):
        self.calls.append(dict(k=k, seed=seed, stop_ids=stop_ids, keys=prompt_keys))
        return [[[100 + len(p) % 50] * min(j + 1, max_new_tokens) for j in range(k)]
                for p in prompt_ids]

def make(model, tokenizer, **options):
    return Reverse(model, tokenizer, **options)

def no_sample(model, tokenizer, **options):
    return object()
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_sampling_backends.py").write_text(FAKE_BACKENDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake_sampling_backends"


def test_registry_hf_and_module_function(model, prompts, fake_module):
    hf = get_backend("hf", model, None, batch_size=3, cache="dynamic")
    assert isinstance(hf, HFBackend)
    got = hf.sample(prompts, 2, MAX_NEW, 1.0, 1.0, 4, [END_OF_TURN_ID], prompt_keys=[9] * 7)
    want = generate(model, None, prompts, max_new_tokens=MAX_NEW, num_samples=2, seed=4,
                    prompt_keys=[9] * 7)  # fmt: skip
    assert got == want and hf.stats["batches"] == 5
    fake = get_backend(f"{fake_module}:make", model, None, batch_size=3)
    assert fake.options == {"batch_size": 3}
    assert fake.sample([[1, 2, 3]], 3, 2, 1.0, 1.0, 0, [4]) == [[[103], [103] * 2, [103] * 2]]
    with pytest.raises(ValueError, match="online.backend must be one of"):
        get_backend("transformers", model, None)
    with pytest.raises(ValueError, match="no callable 'missing'"):
        get_backend(f"{fake_module}:missing", model, None)
    with pytest.raises(TypeError, match="no sample"):
        get_backend(f"{fake_module}:no_sample", model, None)


def test_build_pairs_samples_through_the_backend(fake_module):
    """The pairs come from the backend's completions: reward = text length, so the longest
    sample (j = 2) is chosen and the shortest (j = 0) rejected."""
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.synthetic import generate_split
    from r7b_fast.data.tokenizer import load_tokenizer
    from r7b_fast.online_dpo import build_pairs
    from r7b_fast.rewards import prompt_messages

    tok, rows = load_tokenizer(), generate_split("arith_ar", 3, 0, "train")
    fake = get_backend(f"{fake_module}:make", None, tok)
    pairs, stats = build_pairs(None, tok, rows, lambda rs, ts: [float(len(t)) for t in ts], k=3,
                               max_new_tokens=64, seed=7, stop_ids=[4], backend=fake)  # fmt: skip
    assert fake.calls == [dict(k=3, seed=7, stop_ids=[4], keys=[0, 1, 2])]
    assert len(pairs) == 3 and "frac_prompt_padding" not in stats  # the fake counts nothing
    for row, pair in zip(rows, pairs):
        t = 100 + len(render_prompt(tok, prompt_messages(row))) % 50
        assert pair["chosen"][0]["content"] == tok.decode([t] * 3).strip()
        assert pair["rejected"][0]["content"] == tok.decode([t]).strip()
        assert pair["chosen_reward"] > pair["rejected_reward"]


def test_vllm_backend_without_vllm_names_the_install(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match="pip install vllm"):
        get_backend("vllm", model, None)


def test_vllm_backend_hands_over_the_weights_and_maps_outputs(model, monkeypatch):
    """A stand-in `vllm` module (LLM, SamplingParams): the engine is built once from the config,
    receives every current parameter by its HF name before each call, gets one request per
    prompt with a per-prompt seed, and a stop id reported only as stop_reason is appended."""
    import types

    log = {"built": 0, "loaded": {}, "resets": 0}

    class Completion:
        def __init__(self, ids, reason):
            self.token_ids, self.stop_reason = ids, reason

    class LLM:
        def __init__(self, model, **kw):
            log["built"] += 1
            log["kw"] = kw
            runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
            worker = types.SimpleNamespace(model_runner=runner)
            executor = types.SimpleNamespace(driver_worker=worker)
            self.llm_engine = types.SimpleNamespace(model_executor=executor)

        def _load(self, pairs):
            log["loaded"].update({n: t.clone() for n, t in pairs})

        def reset_prefix_cache(self):
            log["resets"] += 1

        def generate(self, prompts, params, use_tqdm):
            log["params"] = params
            return [types.SimpleNamespace(outputs=[Completion([7, 8], 4), Completion([9, 4], 4)])
                    for _ in prompts]  # fmt: skip

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(sampling, "_ENGINES", {})
    backend = get_backend("vllm", model, None, batch_size=8)
    assert isinstance(backend, VLLMBackend)
    out = backend.sample([[5, 6], [7]], 2, 12, 0.8, 0.9, 3, [4], prompt_keys=[10, 11])
    assert out == [[[7, 8, 4], [9, 4]]] * 2
    named = dict(model.named_parameters())
    assert log["loaded"].keys() == named.keys()
    assert all(torch.equal(log["loaded"][n], p) for n, p in named.items())
    seeds = [p["seed"] for p in log["params"]]
    assert seeds == [3 * 1_000_003 + 10, 3 * 1_000_003 + 11] and log["params"][0]["n"] == 2
    assert log["kw"]["load_format"] == "dummy" and log["kw"]["max_model_len"] == 256
    backend2 = get_backend("vllm", model, None)
    backend2.sample([[5]], 2, 4, 1.0, 1.0, 0, [4])
    assert log["built"] == 1 and log["resets"] == 2  # one engine per model; weights each call
    # the trainer's activation-checkpointing wrappers are not part of the names vLLM receives
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped, log["loaded"] = _model(), {}
    for i, layer in enumerate(wrapped.model.layers):
        wrapped.model.layers[i] = checkpoint_wrapper(layer)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    get_backend("vllm", wrapped, None).sample([[5]], 2, 4, 1.0, 1.0, 0, [4])
    assert log["loaded"].keys() == named.keys() and log["built"] == 2


def _sharded(fully_shard):
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_worker(rank, world, init_file, prompts, out_path):
    """One rank of an FSDP2-sharded tiny model (gloo, CPU): counts the FSDP all-gathers of a
    sampling phase inside `gathered` (sync=False, so ranks run different batch counts), of the
    same sampling per token, and of a training forward + backward after the phase."""
    import json

    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from r7b_fast.sampling import _param_groups, fsdp_modules, gathered

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls, real = [0], param_group.foreach_all_gather

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    param_group.foreach_all_gather = counting
    try:
        keys = list(range(rank, len(prompts), world))  # rank 0: 3 prompts, rank 1: 2
        run = dict(max_new_tokens=MAX_NEW, num_samples=2, batch_size=2, temperature=1.0, seed=3,
                   prompt_keys=keys)  # fmt: skip
        mine = [prompts[i] for i in keys]
        res, model = {}, _sharded(fully_shard)
        with gathered(model) as resident:
            res["entry"], res["resident"] = calls[0], resident
            res["gathered"] = generate(model, None, mine, sync=False, **run)
            res["inside"] = calls[0] - res["entry"]
        res["resharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        start = calls[0]
        res["per_token"] = generate(model, None, mine, **run)
        res["per_token_gathers"] = calls[0] - start
        x = torch.tensor([prompts[0] * 2])
        fresh = _sharded(fully_shard)
        generate(fresh, None, mine, **run)  # the same per-token sampling, no gathered phase
        for name, m in (("after_phase", model), ("fresh", fresh)):
            start = calls[0]
            loss = m(input_ids=x).logits.float().square().mean()
            loss.backward()
            res[name] = dict(loss=loss.item(), gathers=calls[0] - start, flags=[
                [g.post_forward_mesh_info is None for g in _param_groups(f._get_fsdp_state())]
                for f in fsdp_modules(m)])  # fmt: skip
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        param_group.foreach_all_gather = real
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_gathered_once_per_phase(tmp_path, prompts):
    """2 gloo ranks, 5 FSDP modules (4 layers + root): entering `gathered` all-gathers each
    once, the whole sampling phase inside gathers nothing more (and runs without keeping the
    ranks in step), the per-token path gathers on every forward; both give the single-process
    completions (fp32 CPU, same math: exact). After the phase the parameters are sharded again
    and a training forward + backward behaves as on a model that never sampled (same reshard
    settings, same all-gather count, same loss)."""
    import json

    five = prompts[:5]
    out = tmp_path / "result"
    run_two_ranks(_fsdp_worker, (2, str(tmp_path / "init"), five, str(out)), "sampling")
    want = generate(_model(), None, five, max_new_tokens=MAX_NEW, num_samples=2, batch_size=2,
                    temperature=1.0, seed=3)  # fmt: skip
    for rank in (0, 1):
        got = json.loads((tmp_path / f"result.{rank}").read_text())
        mine = [want[i] for i in range(rank, 5, 2)]
        assert got["resident"] and got["gathered"] == mine and got["per_token"] == mine
        assert got["entry"] == 5 and got["inside"] == 0 and got["resharded"]
        forwards = 3 * (1 + MAX_NEW)  # 3 batches (the busiest rank's), prefill + steps at most
        assert 5 * 3 * 2 <= got["per_token_gathers"] <= 5 * forwards
        assert got["after_phase"] == got["fresh"]
        assert got["fresh"]["flags"] == [[True]] + [[False]] * 4  # root kept, layers resharded
        assert got["fresh"]["gathers"] == 4 + 4  # root resident; layers: forward + backward
