"""Resume checkpoints (DCP, atomic, newest complete one wins, pruning) and the HF export."""

import json
import random

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)
from safetensors import safe_open

from r7b_fast import checkpoint
from r7b_fast.distributed import Dist
from r7b_fast.model import build_model, tiny_config

DIST = Dist()


def small_model(seed=0, **kw):
    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, **kw)  # fmt: skip
    return build_model(cfg, torch.float32, seed=seed)


def trained(seed=0):
    model = small_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(8, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_save_load_round_trip(tmp_path):
    model, opt = trained()
    path = checkpoint.save(tmp_path, 5, model, opt, {"step": 5, "data": {"index": 3}}, DIST)
    assert path.name == "step_00000005" and (path / ".metadata").is_file()

    fresh, fresh_opt = trained(seed=1)  # different weights and optimizer state
    state = checkpoint.load(path, fresh, fresh_opt, DIST)
    assert state == {"step": 5, "data": {"index": 3}}
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name]), (k, name)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_rng_restored(tmp_path):
    model, opt = trained()
    torch.manual_seed(42)
    random.seed(42)
    checkpoint.save(tmp_path, 1, model, opt, {"step": 1}, DIST)
    want = (torch.rand(4), random.random())
    torch.manual_seed(0)
    random.seed(0)
    checkpoint.load(checkpoint.latest(tmp_path), model, opt, DIST)
    assert torch.equal(torch.rand(4), want[0]) and random.random() == want[1]


def test_latest_ignores_incomplete_and_prunes(tmp_path):
    model, opt = trained()
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, model, opt, {"step": step}, DIST, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]
    (tmp_path / "step_00000008.tmp").mkdir()  # a save killed half-way
    (tmp_path / "step_00000009").mkdir()  # no .metadata: not a complete checkpoint
    assert checkpoint.latest(tmp_path).name == "step_00000006"
    assert checkpoint.latest(tmp_path / "none") is None


@pytest.mark.parametrize("shard", ["5GB", "40KB"])
def test_hf_export_from_pretrained_identical_logits(tmp_path, shard):
    from transformers import AutoModelForCausalLM

    from r7b_fast.data.tokenizer import load_tokenizer

    model, _ = trained()
    tok = load_tokenizer()
    out = checkpoint.export_hf(model, tmp_path / "hf", DIST, tokenizer=tok, max_shard_size=shard)
    assert not (tmp_path / "hf.tmp").exists()
    files = sorted(p.name for p in out.glob("*.safetensors"))
    names = set()
    for f in files:
        with safe_open(out / f, "pt") as sf:
            names |= set(sf.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied
    if shard == "40KB":
        assert len(files) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == names
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(8, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert (out / "tokenizer.json").is_file()
    assert type(loaded).__name__ == "Cohere2ForCausalLM"


def test_hf_export_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = trained()
    out = checkpoint.export_hf(model, tmp_path / "hf", DIST, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    for name, p in loaded.named_parameters():
        assert torch.equal(p, model.get_parameter(name).to(torch.bfloat16)), name
