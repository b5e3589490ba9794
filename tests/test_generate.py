"""r7b_fast.generate: cached batched sampling against a no-cache argmax loop, stopping, seeds,
batch invariance and the sampler's distribution."""

import pytest
import torch
from _train_helpers import one_thread_module  # noqa: F401 (autouse fixture)

from r7b_fast.generate import generate, sample_next, sampling_noise, stop_token_ids
from r7b_fast.model import END_OF_TURN_ID, build_model, tiny_config

# initializer_range 0.3 (not the default 0.02) so the random model's greedy choice varies from
# step to step: with near-uniform logits greedy repeats one token and the test would prove little.
MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(initializer_range=0.3), seed=0)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    # 40 + 12 tokens > sliding window 32: the cache's sliding layers must drop old keys correctly.
    return [torch.randint(8, 1024, (n,), generator=g).tolist() for n in (3, 40, 17, 1)]


def argmax_loop(model, prompt, n, stop):
    """Reference: full forward over the whole sequence at each step (no cache, no padding)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
            if tok in stop:
                break
    return out


def test_greedy_equals_full_forward_argmax_loop(model, prompts):
    model.train()
    got = generate(model, None, prompts, max_new_tokens=MAX_NEW, temperature=0, batch_size=4)
    assert model.training and model.config.use_cache is False  # eval only during the call
    want = [argmax_loop(model.eval(), p, MAX_NEW, {END_OF_TURN_ID}) for p in prompts]
    model.train()
    assert [o[0] for o in got] == want
    assert len({tuple(w) for w in want}) == len(want) and len(set(want[1])) > 3  # non-trivial


def test_stops_at_stop_token_and_includes_it(model, prompts):
    free = generate(model, None, prompts, max_new_tokens=MAX_NEW, temperature=0)
    stop = free[1][0][5]  # a token prompt 1 emits at step 5
    got = generate(model, None, prompts, max_new_tokens=MAX_NEW, temperature=0, stop_ids=[stop])
    for f, g in zip(free, got):
        cut = f[0].index(stop) + 1 if stop in f[0] else len(f[0])
        assert g[0] == f[0][:cut]
    assert len(got[1][0]) <= 6 and got[1][0][-1] == stop


def test_stop_ids_from_tokenizer_and_config(model):
    class Tok:  # the two attributes stop_token_ids reads
        eos_token_id = 2

        def get_vocab(self):
            return {"<EOS_TOKEN>": 2, "<|END_OF_TURN_TOKEN|>": 4, "a": 9}

    assert stop_token_ids(model, None) == [END_OF_TURN_ID]
    assert stop_token_ids(model, Tok()) == [2, END_OF_TURN_ID]


def test_batch_size_and_padding_do_not_change_results(model, prompts):
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3, num_samples=3)):
        one = generate(model, None, prompts, max_new_tokens=MAX_NEW, batch_size=1, **kw)
        for bs in (2, 5, 64):
            assert (
                generate(model, None, prompts, max_new_tokens=MAX_NEW, batch_size=bs, **kw) == one
            )


def test_seed_determinism(model, prompts):
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, num_samples=3, batch_size=5)
    a = generate(model, None, prompts, seed=7, **kw)
    assert generate(model, None, prompts, seed=7, **kw) == a
    b = generate(model, None, prompts, seed=8, **kw)
    assert a != b
    assert all(len({tuple(s) for s in per_prompt}) == 3 for per_prompt in a)  # samples differ


def test_sampler_matches_softmax_distribution():
    # 40k independent rows (row keys) over a 6-token vocab: the frequency of each token must match
    # softmax(logits / T) within 0.01 (binomial std <= sqrt(0.25 / 40000) = 0.0025: 4 sigma).
    n, logits = 40_000, torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    keys = torch.arange(n, dtype=torch.int64)
    for temp in (1.0, 0.5):
        noise = sampling_noise(11, keys, 0, 6)
        tok = sample_next(logits.expand(n, 6), noise, temperature=temp, top_p=1.0)
        freq = torch.bincount(tok, minlength=6).double() / n
        want = torch.softmax(logits.double() / temp, 0)
        assert (freq - want).abs().max() < 0.01, (temp, freq, want)
    # top_p = 0.8: the nucleus is the smallest prefix (by probability) with mass >= 0.8.
    p = torch.softmax(logits.double(), 0)
    k = int((p.cumsum(0) < 0.8).sum()) + 1
    tok = sample_next(
        logits.expand(n, 6), sampling_noise(11, keys, 0, 6), temperature=1.0, top_p=0.8
    )
    freq = torch.bincount(tok, minlength=6).double() / n
    assert freq[k:].sum() == 0 and (freq[:k] - p[:k] / p[:k].sum()).abs().max() < 0.01
    # noise depends on the step too, and is Exp(1): mean 1 within 0.02 (std 1/sqrt(40000*6)).
    a, b = sampling_noise(11, keys, 0, 6), sampling_noise(11, keys, 1, 6)
    assert not torch.equal(a, b) and abs(a.mean().item() - 1) < 0.02


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, num_samples=0), "num_samples"),
        (dict(max_new_tokens=4, batch_size=0), "batch_size"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    ],
)
def test_bad_arguments_are_named(model, kw, name):
    with pytest.raises(ValueError, match=name):
        generate(model, None, [[5, 6]], **kw)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, None, [[]], max_new_tokens=2)


def test_kernel_patched_model_generates_the_same(prompts):
    """The trainer's policy is patched (r7b_fast.model.apply_kernels: packed-only varlen
    attention, log-prob forward): generate swaps in SDPA for the call and restores the patch."""
    from r7b_fast.model import apply_kernels

    plain = build_model(tiny_config(initializer_range=0.3), seed=0)
    want = generate(plain, None, prompts, max_new_tokens=MAX_NEW, temperature=0)
    patched = apply_kernels(build_model(tiny_config(initializer_range=0.3), seed=0))
    impl = patched.config._attn_implementation
    assert impl not in ("sdpa", "eager")
    assert generate(patched, None, prompts, max_new_tokens=MAX_NEW, temperature=0) == want
    assert patched.config._attn_implementation == impl


def test_generate_text_renders_chat_prompts_and_decodes(model):
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.tokenizer import load_tokenizer
    from r7b_fast.generate import generate_text

    tok = load_tokenizer()
    convo = [{"role": "system", "content": "أجب بعدد."}, {"role": "user", "content": "كم ٢+٣؟"}]
    got = generate_text(model, tok, ["كم ٣+٤؟", convo], max_new_tokens=6, temperature=0)
    ids = [render_prompt(tok, [{"role": "user", "content": "كم ٣+٤؟"}]), render_prompt(tok, convo)]
    want = generate(model, tok, ids, max_new_tokens=6, temperature=0)
    assert got == [[tok.decode(w[0], skip_special_tokens=True).strip()] for w in want]
    assert all(isinstance(t, str) for per in got for t in per)
    with pytest.raises(ValueError, match="prompt"):
        generate_text(model, tok, [42], max_new_tokens=2)
