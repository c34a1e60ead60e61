"""The arcface_torch ViTs (facescale.models.vit), their config keys, and the AdamW recipe in both engines.

Sizes are counted on the meta device (vit_l is 1 GB in fp32); forward/backward runs only vit_t at batch 2. The
DeepSpeed part spawns real gloo ranks (tests/gloo_ranks.py) on the small iresnet_nano: the optimizer, not the
backbone, is what is new there.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from facescale.config import VIT_PREFIX, ConfigError, load_config
from facescale.models import UnknownBackboneError, build_backbone, list_backbones
from facescale.models.layers import DropPath
from facescale.models.vit import VisionTransformer
from facescale.train.components import build_classifier, build_classifier_optimizer
from facescale.train.engine import DDPEngine, EngineError
from gloo_ranks import spawn

REPO = Path(__file__).resolve().parents[1]
# arcface_torch's sizes at embedding 512 (the brief's reference numbers; 144·D·D of them in the first head layer).
EXPECTED_PARAMS = {"vit_t": 19.14e6, "vit_s": 76.02e6, "vit_b": 113.83e6, "vit_l": 255.68e6}
IMAGES = 2  # BatchNorm1d in the head needs more than one sample in train mode


def _images(seed: int = 0, n: int = IMAGES) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _vit_t(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_t", 512, **kwargs)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- sizes and registry
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=512)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(EXPECTED_PARAMS[name], rel=0.01)


def test_vit_names_are_the_config_prefix() -> None:
    # config.py tells ViTs by name (it loads without torch); the registry must agree with it both ways.
    with torch.device("meta"):
        is_vit = {name: isinstance(build_backbone(name), VisionTransformer) for name in list_backbones()}
    vits = {n for n, v in is_vit.items() if v}
    assert vits == {n for n in is_vit if n.startswith(VIT_PREFIX)} == set(EXPECTED_PARAMS)


def test_unknown_vit_lists_the_valid_names() -> None:
    with pytest.raises(UnknownBackboneError) as excinfo:
        build_backbone("vit_h")
    assert all(name in str(excinfo.value) for name in EXPECTED_PARAMS)


def test_architecture_follows_arcface_torch() -> None:
    with torch.device("meta"):
        model = build_backbone("vit_l")
    assert isinstance(model, VisionTransformer)
    assert model.num_patches == 144 and model.patch_embed.proj.kernel_size == (9, 9) and len(model.blocks) == 24
    block = model.blocks[0]
    assert block.attn.num_heads == 8 and block.attn.qkv.bias is None and block.mlp.fc1.out_features == 4 * 768
    assert [type(m) for m in model.feature] == [nn.Linear, nn.BatchNorm1d, nn.Linear, nn.BatchNorm1d]
    assert model.feature[0].in_features == 144 * 768 and model.feature[1].eps == 2e-5
    # Stochastic depth grows linearly from 0 to the rate (vit_l: 0.05, arcface_torch's vit_l_dp005_mask_005).
    rates = [b.drop_path.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05) and rates == sorted(rates)
    assert model.mask_ratio == 0.05


# ---------------------------------------------------------------------------------- masking and drop-path
def test_random_masking_keeps_tokens_and_refills_the_rest() -> None:
    model = _vit_t(mask_ratio=0.25)
    x = torch.randn(3, 144, 256)
    kept, restore = model._random_masking(x)
    assert kept.shape == (3, 108, 256)  # int(144 * 0.75)
    refilled = model._unmask(kept, restore)
    is_original = (refilled == x).all(dim=2)
    is_mask = (refilled == model.mask_token.detach()).all(dim=2)
    assert (is_original ^ is_mask).all()  # every position is either its own token or the mask token
    assert is_mask.sum(dim=1).tolist() == [36, 36, 36]
    assert not torch.equal(is_mask[0], is_mask[1])  # a different random subset per sample


def test_masking_and_drop_path_only_in_train_mode() -> None:
    x = _images()
    model = _vit_t(mask_ratio=0.3, drop_path=0.0)
    plain = _vit_t(mask_ratio=0.0, drop_path=0.0)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.train()(x)
        torch.manual_seed(1)
        a_again = model(x)
        torch.manual_seed(2)
        b = model(x)
        torch.manual_seed(1)
        unmasked = plain.train()(x)
        torch.manual_seed(2)
        unmasked_other_seed = plain(x)
    assert torch.equal(a, a_again)  # the mask follows the seed
    assert not torch.allclose(a, b, atol=1e-3)  # ... and changes the output
    assert torch.equal(unmasked, unmasked_other_seed)  # no mask: no randomness left in train mode
    assert not torch.allclose(a, unmasked, atol=1e-3)

    # Eval: no mask, no drop-path; the same output whatever the seed and rates (same weights and BN statistics).
    noisy = _vit_t(mask_ratio=0.3, drop_path=0.5)
    noisy.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(3)
        e1 = noisy.eval()(x)
        torch.manual_seed(4)
        e2 = noisy(x)
        e_plain = plain.eval()(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, e_plain, rtol=0, atol=0)


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    dp = DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    torch.manual_seed(0)
    out = dp.train()(x)
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert 0.45 < float((per_sample[:, 0] == 0).float().mean()) < 0.55
    assert torch.equal(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop-path"):
        DropPath(1.0)


# ----------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_the_same_output_and_gradients() -> None:
    x = _images()
    ref = _vit_t()  # mask 0.1 and drop-path 0.1: the recomputation must replay the same random draws
    ckpt = _vit_t(activation_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    calls = []
    block_forward = ckpt.blocks[3].forward

    def counted(tokens: torch.Tensor) -> torch.Tensor:  # (forward hooks do not fire in the recomputation)
        calls.append(1)
        return block_forward(tokens)

    ckpt.blocks[3].forward = counted
    outs = []
    for model in (ref, ckpt):
        torch.manual_seed(5)
        out = model.train()(x)
        out.square().mean().backward()
        outs.append(out.detach())
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing is on
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # no gradients, no recomputation: eval and no_grad run the blocks once
        ckpt.eval()(x)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------- config
def test_vit_keys_are_refused_on_other_backbones() -> None:
    for key in ("model.vit.mask_ratio=0.1", "model.vit.drop_path=0.1", "model.activation_checkpointing=true"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_config(None, ["model.backbone=iresnet50", key])
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(None, ["model.backbone=vit_t", "model.dropout=0.1"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(None, ["model.backbone=vit_t", "model.vit.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="model.vit.depth: unknown key"):
        load_config(None, ["model.backbone=vit_t", "model.vit.depth=3"])
    cfg = load_config(None, ["model.backbone=vit_s", "model.vit.drop_path=0.2", "model.activation_checkpointing=true"])
    assert cfg.model.backbone_kwargs() == {"drop_path": 0.2, "activation_checkpointing": True}
    assert load_config(None, ["model.dropout=0.2"]).model.backbone_kwargs() == {"dropout": 0.2}
    with pytest.raises(ConfigError, match="train.betas"):
        load_config(None, ["train.optimizer=adamw", "train.betas=[0.9, 1.0]"])


def test_vit_b_config_loads_with_the_arcface_torch_recipe() -> None:
    cfg = load_config(REPO / "configs" / "vit_b.yaml")
    t = cfg.train
    assert (cfg.model.backbone, t.optimizer, t.lr, t.weight_decay, t.lr_power) == ("vit_b", "adamw", 1e-3, 0.1, 2.0)
    assert t.batch_size * t.grad_accum_steps * cfg.scaling.num_workers == 256 * 12 * 8  # global batch 24,576
    assert t.warmup_steps == 42_474_557 // 24_576 * 4  # 4 warm-up epochs of WebFace42M, in optimizer steps
    assert (cfg.classifier.type, cfg.classifier.sample_rate, cfg.classifier.margin.m) == ("partial_fc", 0.3, 0.4)
    with torch.device("meta"):
        model = build_backbone(cfg.model.backbone, cfg.model.embedding_size, **cfg.model.backbone_kwargs())
    assert isinstance(model, VisionTransformer) and model.activation_checkpointing and model.mask_ratio == 0.05
    assert model.blocks[-1].drop_path.p == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------------- AdamW
def _adamw_cfg(*extra: str):
    return load_config(None, ["model.backbone=vit_t", "model.embedding_size=32", "train.optimizer=adamw",
                              "train.lr=1e-3", "train.weight_decay=0.1", "train.betas=[0.8, 0.95]", "train.eps=1e-6",
                              "train.grad_clip=null", "classifier.type=linear", *extra])


def test_adamw_step_is_torchs_with_decoupled_weight_decay() -> None:
    cfg = _adamw_cfg()
    torch.manual_seed(0)
    backbone = build_backbone("vit_t", 32, **cfg.model.backbone_kwargs())
    engine = DDPEngine(backbone, torch.device("cpu"), cfg.train)
    opt = engine.optimizer
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.8, 0.95), 1e-6, 0.1)
    classifier = build_classifier(cfg, 5, torch.device("cpu"))
    assert type(build_classifier_optimizer(cfg, classifier)) is torch.optim.AdamW

    labels = torch.tensor([1, 3])
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    losses = []
    for step in range(2):
        with engine.micro_batch(last=True):
            torch.manual_seed(10 + step)
            loss = classifier(engine.forward(_images(step)), labels)
            engine.backward(loss)
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in backbone.named_parameters()}
        assert engine.step()
        losses.append(float(loss.detach()))
        if step == 0:
            # By hand, Adam's first step: m̂ = g, v̂ = g², so the update is lr·g / (|g| + eps), after the decoupled
            # decay w ← w·(1 − lr·wd). (L2 decay would put wd·w inside g instead.)
            for n, p in backbone.named_parameters():
                g, w0 = grads[n], before[n]
                want = w0 * (1 - 1e-3 * 0.1) - 1e-3 * g / (g.abs() + 1e-6)
                torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-8, msg=lambda m, n=n: f"{n}: {m}")
    assert all(torch.isfinite(torch.tensor(losses)))

    # Checkpoint round trip: AdamW's state by parameter name, and the next step equals torch's own on a copy.
    state = engine.state_dict()
    entry = state["optimizer"]["state"]["pos_embed"]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq"} and float(entry["step"]) == 2.0
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    reference = copy.deepcopy(opt)
    restored = DDPEngine(build_backbone("vit_t", 32, **cfg.model.backbone_kwargs()), torch.device("cpu"), cfg.train)
    restored.load_state_dict(state)
    new_step = restored.optimizer.state[restored.backbone.pos_embed]["step"]
    assert new_step.device.type == "cpu" and new_step.dtype == torch.float32
    for p, q, r in zip(backbone.parameters(), restored.backbone.parameters(), reference.param_groups[0]["params"]):
        g = torch.randn_like(p)
        p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
    opt.step()
    restored.optimizer.step()
    for (n, p), q in zip(backbone.named_parameters(), restored.backbone.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")

    sgd = DDPEngine(build_backbone("vit_t", 32), torch.device("cpu"), load_config(None, ["train.optimizer=sgd"]).train)
    with pytest.raises(EngineError, match="train.optimizer 'sgd'"):
        sgd.load_state_dict(state)


def test_partial_fc_gets_the_sparse_adamw() -> None:
    from facescale.parallel import PartialFC
    from facescale.parallel.optim import SparseRowAdamW

    cfg = _adamw_cfg("classifier.type=partial_fc", "classifier.second_moment=full")
    pfc = build_classifier(cfg, 10, torch.device("cpu"))
    assert isinstance(pfc, PartialFC)
    opt = build_classifier_optimizer(cfg, pfc)
    assert isinstance(opt, SparseRowAdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.second_moment == "full"
    sgd_cfg = load_config(None, ["classifier.type=partial_fc"])
    sgd_pfc = build_classifier(sgd_cfg, 10, torch.device("cpu"))
    assert type(build_classifier_optimizer(sgd_cfg, sgd_pfc)).__name__ == "SparseRowSGD"


# ------------------------------------------------------------------------- DeepSpeed with the torch AdamW
def _deepspeed_adamw_worker(rank: int, world_size: int) -> None:
    from facescale.train.engine import build_engine

    states, curves = {}, {}
    for kind, extra in (("ddp", ["train.engine=ddp"]),
                        ("zero2", ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"]),
                        ("zero3", ["train.engine=deepspeed", "train.deepspeed.zero_stage=3"])):
        cfg = load_config(None, ["model.backbone=iresnet_nano", "model.embedding_size=16", "train.optimizer=adamw",
                                 "train.lr=1e-3", "train.weight_decay=0.1", "train.batch_size=2", *extra])
        torch.manual_seed(0)
        engine = build_engine(cfg, build_backbone("iresnet_nano", 16).eval(), torch.device("cpu"))
        assert type(engine.optimizer) is torch.optim.AdamW  # the client torch optimizer, not DeepSpeed's fused Adam
        curve = []
        for step in range(3):
            images = _images(100 + step, 2 * world_size)[2 * rank:2 * rank + 2]
            with engine.micro_batch(last=True):
                loss = engine.forward(images).square().mean()
                engine.backward(loss)
            assert engine.step()
            curve.append(float(loss))
        states[kind], curves[kind] = engine.state_dict(), curve
        if kind != "ddp":
            fresh = build_engine(cfg, build_backbone("iresnet_nano", 16).eval(), torch.device("cpu"))
            fresh.load_state_dict(states[kind])
            again = fresh.state_dict()
            for name, entry in states[kind]["optimizer"]["state"].items():
                for key, value in entry.items():
                    torch.testing.assert_close(again["optimizer"]["state"][name][key], value, rtol=0, atol=0)
    ddp = states["ddp"]["optimizer"]["state"]
    assert ddp
    for kind in ("zero2", "zero3"):
        torch.testing.assert_close(torch.tensor(curves[kind]), torch.tensor(curves["ddp"]), rtol=2e-5, atol=0)
        zero = states[kind]["optimizer"]["state"]
        assert ddp.keys() == zero.keys(), kind
        for name, entry in ddp.items():
            assert float(zero[name]["step"]) == float(entry["step"]) == 3.0
            for key in ("exp_avg", "exp_avg_sq"):
                scale = float(entry[key].abs().max()) + 1e-12
                torch.testing.assert_close(zero[name][key], entry[key], rtol=0, atol=1e-4 * scale,
                                           msg=lambda m, n=name, k=key, z=kind: f"{z} {n} {k}: {m}")


def _vit_engines_worker(rank: int, world_size: int) -> None:
    """A small ViT without masking (its mask token unused, hence frozen) and with activation checkpointing trains
    alike under 2-rank DDP and ZeRO-3: DDP would otherwise wait for the token's gradient, and ZeRO-3 gathers the
    partitioned weights again for the recomputation."""
    from facescale.train.engine import build_engine

    curves = {}
    for kind, extra in (("ddp", ["train.engine=ddp"]),
                        ("zero3", ["train.engine=deepspeed", "train.deepspeed.zero_stage=3"])):
        cfg = load_config(None, ["model.backbone=vit_t", "train.optimizer=adamw", "train.lr=1e-3",
                                 "train.batch_size=2", *extra])
        torch.manual_seed(0)
        backbone = VisionTransformer(16, dim=32, depth=2, mask_ratio=0.0, drop_path=0.0,
                                     activation_checkpointing=True).train()
        assert not backbone.mask_token.requires_grad
        engine = build_engine(cfg, backbone, torch.device("cpu"))
        curve = []
        for step in range(3):
            images = _images(200 + step, 2 * world_size)[2 * rank:2 * rank + 2]
            with engine.micro_batch(last=True):
                loss = engine.forward(images).square().mean()
                engine.backward(loss)
            assert engine.step()
            curve.append(float(loss))
        curves[kind] = curve
    torch.testing.assert_close(torch.tensor(curves["zero3"]), torch.tensor(curves["ddp"]), rtol=2e-5, atol=0)


def _engines_worker(rank: int, world_size: int) -> None:
    _deepspeed_adamw_worker(rank, world_size)
    _vit_engines_worker(rank, world_size)


def test_deepspeed_adamw_matches_ddp_and_round_trips_and_trains_a_vit() -> None:
    spawn(_engines_worker, 2)
