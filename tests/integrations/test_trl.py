"""fastsd.integrations.trl: TRL's own loss path against the fused one on the same trainer, batch
and weights (loss and every parameter's gradient within fp32 tolerance), no [B, T, V] logits on
the fused path, and every refused option's error."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

pytest.importorskip("trl")

from helpers import GRAD_TOL, VALUE_TOL, rel_err  # noqa: E402
from trl_setup import gkd_batch, gkd_trainer, loss_and_grads, save_tiny, sd_batch, sd_trainer  # noqa: E402

from fastsd.integrations.trl import use_fastsd_loss  # noqa: E402

VOCAB = 99  # the built-in tokenizer's


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    return save_tiny(root / "student", seed=0), save_tiny(root / "teacher", seed=1)


def head_widths(model):
    """Records the positions (dim 1) of every lm_head output while the returned list lives."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    return seen


def compare(trainer, inputs, **kwargs):
    """TRL's loss and gradients, then fastsd's on the same trainer: equal within fp32 tolerance,
    and the fused path's forwards computed the logits of one position only."""
    ref_loss, ref_grads = loss_and_grads(trainer, inputs, **kwargs)
    use_fastsd_loss(trainer)
    widths = head_widths(trainer.accelerator.unwrap_model(trainer.model))
    loss, grads = loss_and_grads(trainer, inputs, **kwargs)
    assert widths and set(widths) == {1}, f"lm_head saw {widths} positions: logits were materialised"
    assert rel_err(loss, ref_loss) < VALUE_TOL[torch.float32], (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < GRAD_TOL[torch.float32], name
    return ref_loss


SD_CASES = {
    "full-forward-kl": dict(distillation_mode="full_logits", distillation_alpha=0.0),
    "full-jsd": dict(distillation_mode="full_logits", distillation_alpha=0.3),
    "full-reverse-kl-temperature": dict(distillation_mode="full_logits", distillation_alpha=1.0, temperature=0.7),
    "topk-tail": dict(distillation_mode="topk_logits", distillation_topk=7, distillation_add_tail=True,
                      distillation_alpha=0.5),
    "topk-renormalised": dict(distillation_mode="topk_logits", distillation_topk=7, distillation_alpha=1.0,
                              temperature=1.3),
    "sampled-token": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
}


# SDFT's loss code is SDPO's (TRL 1.16 ships the same loss_utils twice): two cases run on both
@pytest.mark.parametrize("kind, case", [("sdpo", c) for c in SD_CASES] + [("sdft", "full-jsd"), ("sdft", "topk-tail")])
def test_self_distillation_matches_trl(kind, case, paths, tmp_path):
    trainer = sd_trainer(kind, paths[0], str(tmp_path), **SD_CASES[case])
    teacher = LlamaForCausalLM.from_pretrained(paths[1])  # a teacher with its own weights and head
    trainer.teacher_model.load_state_dict(teacher.state_dict())
    loss = compare(trainer, sd_batch(VOCAB, torch.Generator().manual_seed(len(case))))
    assert loss != 0  # the teacher has its own weights and prompt: a real divergence, not 0 against 0


@pytest.mark.parametrize("kind", ["sdpo", "sdft"])
@pytest.mark.parametrize("mode", ["full_logits", "topk_logits", "sampled_token"])
def test_importance_sampling_clip_matches_trl(kind, mode, paths, tmp_path):
    """old_per_token_logps spread around the current ones, so that some ratios pass the clip."""
    extra = dict(distillation_topk=5, distillation_add_tail=True) if mode == "topk_logits" else {}
    trainer = sd_trainer(kind, paths[0], str(tmp_path), distillation_mode=mode, distillation_alpha=1.0,
                         distillation_is_clip=1.5, temperature=0.8, **extra)
    g = torch.Generator().manual_seed(7)
    batch = sd_batch(VOCAB, g)
    with torch.no_grad():
        logits = trainer._forward_logits(trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                                         torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), 6)
        now = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    old = now + torch.randn(now.shape, generator=g)
    assert (torch.exp(now - old) > 1.5).any() and (torch.exp(now - old) < 1.5).any()
    compare(trainer, {**batch, "old_per_token_logps": old})


def test_sdft_skipped_tokens_match_trl(paths, tmp_path):
    trainer = sd_trainer("sdft", paths[0], str(tmp_path), distillation_mode="full_logits",
                         distillation_alpha=0.5, num_loss_tokens_to_skip=2)
    compare(trainer, sd_batch(VOCAB, torch.Generator().manual_seed(3)))


def test_nothing_to_distil_gives_zero_with_trl(paths, tmp_path):
    trainer = sd_trainer("sdpo", paths[0], str(tmp_path), distillation_mode="full_logits")
    batch = sd_batch(VOCAB, torch.Generator().manual_seed(4))
    batch["self_distillation_mask"] = torch.zeros(3)
    assert compare(trainer, batch) == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 11])
def test_gkd_matches_trl(beta, num_items, paths, tmp_path):
    trainer = gkd_trainer(paths[0], paths[1], str(tmp_path), beta=beta, temperature=0.6)
    loss = compare(trainer, gkd_batch(VOCAB, torch.Generator().manual_seed(5)), num_items_in_batch=num_items)
    assert loss > 0


def test_gkd_evaluation_keeps_trl_outputs(paths, tmp_path):
    trainer = use_fastsd_loss(gkd_trainer(paths[0], paths[1], str(tmp_path)))
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(trainer.model, gkd_batch(VOCAB, torch.Generator().manual_seed(6)),
                                             return_outputs=True)
    assert outputs.logits.shape == (3, 12, VOCAB) and loss > 0


@pytest.mark.parametrize("config, match", [
    (dict(distillation_weight=0.5), "distillation_weight=0.5"),
    (dict(distillation_mode="topk_logits", distillation_topk=VOCAB + 1), "distillation_topk: 100 exceeds"),
])
def test_refused_options(config, match, paths, tmp_path):
    trainer = sd_trainer("sdpo", paths[0], str(tmp_path), **config)
    with pytest.raises(ValueError, match=match):
        use_fastsd_loss(trainer)


def test_refused_trainer_state(paths, tmp_path):
    trainer = sd_trainer("sdpo", paths[0], str(tmp_path), distillation_mode="full_logits")
    trainer.args.use_teacher_server = True
    with pytest.raises(ValueError, match="use_teacher_server=True"):
        use_fastsd_loss(trainer)
    trainer.args.use_teacher_server = False
    trainer.args.distillation_topk, trainer.args.distillation_mode = None, "topk_logits"
    with pytest.raises(ValueError, match="distillation_topk: distillation_mode='topk_logits' needs it"):
        use_fastsd_loss(trainer)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="fsdp"):
        use_fastsd_loss(trainer)
    with pytest.raises(TypeError, match="trainer: expected TRL's"):
        use_fastsd_loss(object())


@pytest.mark.parametrize("change, match", [
    (lambda m: setattr(m, "lm_head", torch.nn.Linear(96, VOCAB, bias=True)), "model: lm_head has a bias"),
    (lambda m: setattr(m.config, "final_logit_softcapping", 30.0), "model: config.final_logit_softcapping=30.0"),
    (lambda m: setattr(m, "lm_head", torch.nn.Sequential(m.lm_head)), "model: its output embedding is a Sequential"),
])
def test_refused_models(change, match, paths, tmp_path):
    trainer = sd_trainer("sdft", paths[0], str(tmp_path), distillation_mode="full_logits")
    change(trainer.model)
    with pytest.raises(ValueError, match=match):
        use_fastsd_loss(trainer)


def test_refused_placement_forward_and_version(paths, tmp_path, monkeypatch):
    """ZeRO-3 (the head sharded outside the forward), a forward without logits_to_keep, a TRL
    without the hooks, and a warning for a TRL outside the tested range."""
    import types

    import trl
    from trl.experimental.sdpo import SDPOTrainer

    trainer = sd_trainer("sdpo", paths[0], str(tmp_path), distillation_mode="full_logits")
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match="tested with trl>=1.16,<1.17, found 1.17.0"):
        use_fastsd_loss(sd_trainer("sdpo", paths[0], str(tmp_path), distillation_mode="full_logits"))
    monkeypatch.setattr(trl, "__version__", "1.16.0")
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True, raising=False)
    accelerator = trainer.accelerator
    zero3 = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=3)))
    monkeypatch.setattr(trainer, "accelerator", zero3)
    with pytest.raises(ValueError, match="deepspeed: ZeRO-3"):
        use_fastsd_loss(trainer)
    monkeypatch.setattr(trainer, "accelerator", accelerator)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", False)
    monkeypatch.setattr(trainer.teacher_model, "forward", lambda input_ids, attention_mask=None: None)
    with pytest.raises(ValueError, match="teacher_model: LlamaForCausalLM.forward takes no logits_to_keep"):
        use_fastsd_loss(trainer)
    monkeypatch.delattr(SDPOTrainer, "_compute_self_distillation_loss")
    with pytest.raises(TypeError, match=r"lacks \['_compute_self_distillation_loss'\]"):
        use_fastsd_loss(trainer)


@pytest.mark.parametrize("kind", ["sdft", "gkd"])
def test_train_runs_on_the_fused_path(kind, paths, tmp_path):
    """trainer.train() itself (rollouts or on-policy samples, the loss, the optimizer) for two
    steps on the fused path: the logged loss is finite and non-zero and no logits were made."""
    run = dict(max_steps=2, logging_steps=1, save_strategy="no")
    if kind == "gkd":
        trainer = gkd_trainer(paths[0], paths[1], str(tmp_path), max_new_tokens=4, lmbda=0.5, **run)
    else:
        trainer = sd_trainer("sdft", paths[0], str(tmp_path), distillation_mode="topk_logits", distillation_topk=5,
                             **run)
    use_fastsd_loss(trainer)
    widths = head_widths(trainer.model)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and out.training_loss != 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert widths and set(widths) == {1}, widths
