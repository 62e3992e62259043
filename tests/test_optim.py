"""Weight-decay groups, the AdamW build, and the LR schedule against its closed form."""

import math
import re

import pytest
import torch
from torch import nn

from helpers_train import load_example
from ironcore.config.schema import OptimConfig
from ironcore.errors import ConfigError
from ironcore.optim import build_optimizer, build_scheduler, lr_at, no_decay_parameter_names, param_groups


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.norm2 = nn.RMSNorm(d)


class TinyLM(nn.Module):
    """Token + position embeddings, two blocks, final norm, lm_head tied to the token embedding by default."""

    def __init__(self, vocab: int = 32, d: int = 8, seq: int = 6, tied: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


NORMS_AND_BIASES = {
    f"h.{i}.{n}" for i in (0, 1) for n in ("ln.weight", "ln.bias", "fc.bias", "norm2.weight")
} | {"ln_f.weight", "ln_f.bias"}
MATRICES = {f"h.{i}.{n}" for i in (0, 1) for n in ("fc.weight", "proj.weight")}


def group_names(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in groups]


def test_no_decay_rule_with_tied_embedding():
    model = TinyLM(tied=True)
    assert no_decay_parameter_names(model, OptimConfig()) == NORMS_AND_BIASES | {"wte.weight", "wpe.weight"}
    decay, no_decay = group_names(model, param_groups(model, OptimConfig(weight_decay=0.1)))
    assert decay == MATRICES
    assert no_decay == NORMS_AND_BIASES | {"wte.weight", "wpe.weight"}
    # the tied lm_head is the token embedding tensor: listed once, never in both groups
    groups = param_groups(model, OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in groups[1]["params"])


def test_embeddings_decay_when_asked_and_untied_head_always_decays():
    model = TinyLM(tied=True)
    decay, no_decay = group_names(model, param_groups(model, OptimConfig(no_decay_on_embedding=False)))
    assert decay == MATRICES | {"wte.weight", "wpe.weight"}
    assert no_decay == NORMS_AND_BIASES

    untied = TinyLM(tied=False)
    decay, no_decay = group_names(untied, param_groups(untied, OptimConfig()))
    assert decay == MATRICES | {"lm_head.weight"}
    assert no_decay == NORMS_AND_BIASES | {"wte.weight", "wpe.weight"}



def test_zero3_partitioned_parameters_are_grouped_by_their_full_shape(monkeypatch):
    """Built under a real `deepspeed.zero.Init` (CPU, a gloo world of 1), every parameter is a flat 1-d shard
    (what `load_pretrained_partitioned` hands the optimizer); the groups follow the full shapes (`ds_shape`),
    exactly as for the same model unpartitioned, so the decay group is not emptied."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3},
                                                      "train_micro_batch_size_per_gpu": 1}):
            model = TinyLM(tied=False)
    finally:
        dist.destroy_process_group()
    assert {p.ndim for p in model.parameters()} == {1}
    assert model.h[0].fc.weight.ds_shape == (16, 8)
    decay, no_decay = group_names(model, param_groups(model, OptimConfig()))
    assert decay == MATRICES | {"lm_head.weight"}
    assert no_decay == NORMS_AND_BIASES | {"wte.weight", "wpe.weight"}

NORM_OR_BIAS = re.compile(r"(\.bias$|(^|\.)(attn_norm|mlp_norm|norm)\.weight$)")


@pytest.mark.parametrize("no_decay_on_embedding", [True, False])
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_no_decay_groups_of_the_real_model(tmp_path, preset, no_decay_on_embedding):
    """IronCoreForCausalLM built from a preset: GPT-2-like (LayerNorm with bias, biased projections, learned
    positions, head tied to the token embedding) and LLaMA-like (RMSNorm, no bias, rope, untied head). No decay
    on exactly the biases and norm weights, plus the token / position embeddings when no_decay_on_embedding; every
    projection, and an untied lm_head, decays."""
    from ironcore.models import build_model

    run = load_example("pretrain", tmp_path / "run", f"model={preset}",
                       f"optim.no_decay_on_embedding={str(no_decay_on_embedding).lower()}")
    model = build_model(run)
    names = {name for name, _ in model.named_parameters()}
    embeddings = {name for name in names if name.startswith(("model.embed_tokens.", "model.embed_positions."))}
    want_no_decay = {name for name in names if NORM_OR_BIAS.search(name)}
    if no_decay_on_embedding:
        want_no_decay |= embeddings
    optimizer = build_optimizer(model, run.optim, "cpu")
    decay, no_decay = group_names(model, optimizer.param_groups)
    assert no_decay == want_no_decay and decay == names - want_no_decay
    assert run.optim.weight_decay > 0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [run.optim.weight_decay, 0.0]
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 2)[-2] for name in decay} >= projections
    if preset == "tiny-gpt2":
        assert model.lm_head.weight is model.model.embed_tokens.weight and "lm_head.weight" not in names
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.bias",
                "model.layers.0.attn_norm.bias", "model.norm.bias"} <= no_decay
        assert ("model.embed_positions.weight" in no_decay) is no_decay_on_embedding
    else:
        assert not any(name.endswith(".bias") for name in names) and "model.embed_positions.weight" not in names
        assert "lm_head.weight" in decay and "model.layers.0.mlp.gate_proj.weight" in decay
        assert {"model.layers.0.attn_norm.weight", "model.norm.weight"} <= no_decay
    assert ("model.embed_tokens.weight" in no_decay) is no_decay_on_embedding


def test_frozen_parameters_are_left_out():
    model = TinyLM()
    model.wpe.weight.requires_grad_(False)
    model.h[0].fc.weight.requires_grad_(False)
    decay, no_decay = group_names(model, param_groups(model, OptimConfig()))
    assert "wpe.weight" not in no_decay and "h.0.fc.weight" not in decay


def test_build_optimizer_settings_and_fused_step_matches_reference():
    optim = OptimConfig(max_lr=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-7)
    torch.manual_seed(0)
    model = TinyLM()
    reference = TinyLM()
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(model, optim, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (3e-3, (0.8, 0.9), 1e-7)
    assert opt.param_groups[0]["fused"] is True  # torch 2.13 ships a fused CPU AdamW
    ref_groups = param_groups(reference, optim)
    ref_opt = torch.optim.AdamW(ref_groups, lr=3e-3, betas=(0.8, 0.9), eps=1e-7, foreach=False)
    ids = torch.randint(0, 32, (2, 6))
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            h = m.wte(ids) + m.wpe(torch.arange(6))
            for blk in m.h:
                h = h + blk.proj(torch.relu(blk.fc(blk.ln(h))))
                h = blk.norm2(h)
            m.lm_head(m.ln_f(h)).logsumexp(-1).mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_optimizer_fused_on_cuda():
    model = TinyLM().cuda()
    opt = build_optimizer(model, OptimConfig(), "cuda")
    assert all(g["fused"] for g in opt.param_groups)
    block = model.h[0]
    hidden = block.proj(block.fc(model.wte(torch.zeros(1, 2, dtype=torch.long, device="cuda"))))
    model.lm_head(hidden).sum().backward()
    before = block.fc.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, block.fc.weight)


def expected_lr(step: int, kind: str, max_lr: float, min_lr: float, warmup: int, end: int) -> float:
    """The schedule written out independently of ironcore.optim."""
    if step < warmup:
        return max_lr * step / warmup
    if kind == "constant":
        return max_lr
    if step >= end:
        return min_lr
    p = (step - warmup) / (end - warmup)
    if kind == "cosine":
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    return min_lr + (max_lr - min_lr) * (1 - p)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,annealing,train_steps", [(3, 11, 15), (0, 0, 9), (4, 0, 12)])
def test_scheduler_follows_closed_form_per_optimizer_step(kind, warmup, annealing, train_steps):
    optim = OptimConfig(lr_scheduler=kind, max_lr=1e-3, min_lr=1e-4, warmup_steps=warmup, annealing_steps=annealing)
    end = annealing or train_steps
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = build_optimizer(model, optim, "cpu")
    sched = build_scheduler(opt, optim, train_steps)
    for step in range(train_steps + 3):
        want = expected_lr(step, kind, 1e-3, 1e-4, warmup, end)
        assert lr_at(step, optim, train_steps) == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert [g["lr"] for g in opt.param_groups] == [lr_at(step, optim, train_steps)] * 2
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    # landmarks: 0 at the start of warmup, max_lr at its end, min_lr from the annealing end on
    if warmup:
        assert lr_at(0, optim, train_steps) == 0.0
    assert lr_at(warmup, optim, train_steps) == pytest.approx(1e-3)
    floor = 1e-3 if kind == "constant" else 1e-4
    assert lr_at(end, optim, train_steps) == pytest.approx(floor)
    assert lr_at(end + 5, optim, train_steps) == pytest.approx(floor)


def test_cosine_midpoint_and_resume_from_state_dict():
    optim = OptimConfig(lr_scheduler="cosine", max_lr=1e-3, min_lr=1e-4, warmup_steps=2, annealing_steps=12)
    assert lr_at(7, optim, 20) == pytest.approx(5.5e-4)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, optim, "cpu")
    sched = build_scheduler(opt, optim, 20)
    for _ in range(5):
        opt.step()
        sched.step()
    fresh_opt = build_optimizer(model, optim, "cpu")
    fresh = build_scheduler(fresh_opt, optim, 20)
    fresh_opt.load_state_dict(opt.state_dict())
    fresh.load_state_dict(sched.state_dict())
    assert fresh.get_last_lr() == [lr_at(5, optim, 20)] * 2
    fresh_opt.step()
    fresh.step()
    assert [g["lr"] for g in fresh_opt.param_groups] == [lr_at(6, optim, 20)] * 2


def test_schedules_that_cannot_be_drawn_are_config_errors():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="optim.min_lr"):
        build_scheduler(opt, OptimConfig(max_lr=1e-3, min_lr=1e-2), 10)
    with pytest.raises(ConfigError, match="optim.warmup_steps .* operation.train_steps"):
        build_scheduler(opt, OptimConfig(warmup_steps=10), 10)
    with pytest.raises(ConfigError, match="optim.annealing_steps"):
        build_scheduler(opt, OptimConfig(warmup_steps=5, annealing_steps=5), 100)
    build_scheduler(opt, OptimConfig(lr_scheduler="constant", warmup_steps=10), 10)
