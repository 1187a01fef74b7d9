"""trainer/parts/ema.py: decay law, update interval, swap-in/restore, state round trip."""

import pytest
import torch
from torch import nn

from trainer.parts.ema import EMA, decay_from_strength_target, ema_decay_for_run
from trainer.runtime.errors import CheckpointError, ConfigError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.frozen = nn.Linear(2, 2).double()
        self.frozen.requires_grad_(False)
        self.register_buffer("counter", torch.zeros(1, dtype=torch.float64))


def make(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def test_decay_from_strength_target():
    d = decay_from_strength_target(0.1, 40)
    assert d**40 == pytest.approx(0.1, rel=1e-12)
    with pytest.raises(ConfigError, match="ema_strength_target"):
        decay_from_strength_target(1.5, 10)
    with pytest.raises(ConfigError, match="ema_strength_target"):
        decay_from_strength_target(0.5, 0)


def test_an_ema_that_would_never_update_is_refused():
    """Issue 13 item 6: 30 steps with ema_update_interval 50 used to export the base model as EMA."""
    with pytest.raises(
        ConfigError, match=r"ema_strength_target .* 30 optimizer steps and ema_update_interval is 50"
    ):
        ema_decay_for_run(decay_rate=None, strength_target=0.1, update_interval=50, total_steps=30)
    with pytest.raises(ConfigError, match=r"ema_decay_rate .* at most 30 \(e.g. 3\)"):
        ema_decay_for_run(decay_rate=0.99, strength_target=None, update_interval=50, total_steps=30)
    assert ema_decay_for_run(decay_rate=None, strength_target=0.1, update_interval=10, total_steps=30) == (
        pytest.approx(0.1 ** (1 / 3), rel=1e-12)
    )
    assert (
        ema_decay_for_run(decay_rate=0.99, strength_target=None, update_interval=30, total_steps=30) == 0.99
    )


def test_follows_decay_law_exactly_for_constant_param():
    model = make()
    e0 = {n: p.detach().clone() for n, p in model.lin.named_parameters()}
    ema = EMA({"unet": model}, decay=0.9, update_interval=1)
    with torch.no_grad():
        model.lin.weight.fill_(2.0)
        model.lin.bias.fill_(-1.0)
    n = 25
    for _ in range(n):
        ema.update()
    assert ema.num_updates == n
    shadow = ema.shadow["unet"]
    torch.testing.assert_close(
        shadow["lin.weight"], 2.0 + (e0["weight"] - 2.0) * 0.9**n, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(shadow["lin.bias"], -1.0 + (e0["bias"] + 1.0) * 0.9**n, rtol=1e-12, atol=1e-12)
    assert set(shadow) == {"lin.weight", "lin.bias"}  # frozen parameters are not tracked


def test_buffers_are_copied_not_averaged():
    model = make()
    ema = EMA({"unet": model}, decay=0.99, update_interval=1)
    model.counter.fill_(7.0)
    ema.update()
    assert ema.buffers["unet"]["counter"].item() == 7.0


def test_update_interval_counts_optimizer_steps():
    model = make()
    ema = EMA({"unet": model}, decay=0.5, update_interval=3)
    fired = [step for step in range(0, 10) if ema.maybe_update(step)]
    assert fired == [3, 6, 9]
    assert ema.num_updates == 3
    with pytest.raises(ConfigError, match="ema_update_interval"):
        EMA({"unet": model}, decay=0.5, update_interval=0)
    with pytest.raises(ConfigError, match="ema_decay_rate"):
        EMA({"unet": model}, decay=1.5, update_interval=1)


def test_state_dict_round_trip_and_mismatch():
    model = make()
    ema = EMA({"unet": model}, decay=0.8, update_interval=2)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    ema.update()
    state = ema.state_dict()

    other = EMA({"unet": model}, decay=0.8, update_interval=2)  # fresh shadows == live weights
    assert not torch.equal(other.shadow["unet"]["lin.weight"], ema.shadow["unet"]["lin.weight"])
    other.load_state_dict(state)
    assert other.num_updates == 1
    for n, t in ema.shadow["unet"].items():
        assert torch.equal(other.shadow["unet"][n], t)
    # continuing both gives identical results
    ema.update()
    other.update()
    for n, t in ema.shadow["unet"].items():
        assert torch.equal(other.shadow["unet"][n], t)

    wrong = EMA({"te": make()}, decay=0.8, update_interval=2)
    with pytest.raises(CheckpointError, match="components"):
        wrong.load_state_dict(state)
    frozen_differently = make()
    frozen_differently.lin.bias.requires_grad_(False)
    with pytest.raises(CheckpointError, match="trainable"):
        EMA({"unet": frozen_differently}, decay=0.8, update_interval=2).load_state_dict(state)


def test_swapped_in_loads_ema_and_restores_bitwise():
    model = make()
    ema = EMA({"unet": model}, decay=0.5, update_interval=1)
    with torch.no_grad():
        model.lin.weight.mul_(3.0).add_(0.1234567)
    ema.update()
    live = {n: t.clone() for n, t in model.state_dict().items()}
    with ema.swapped_in({"unet": model}):
        assert torch.equal(model.lin.weight, ema.shadow["unet"]["lin.weight"])
        assert not torch.equal(model.lin.weight, live["lin.weight"])
        assert torch.equal(model.frozen.weight, live["frozen.weight"])
    for n, t in model.state_dict().items():
        assert torch.equal(t, live[n]), n
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in({"unet": model}):
        raise RuntimeError("boom")
    for n, t in model.state_dict().items():
        assert torch.equal(t, live[n]), n


def test_swap_covers_exactly_the_tracked_components():
    """Issue 13 item 1: with a frozen text encoder the EMA tracks only the UNet; saving and
    sampling hand over both modules, and the frozen one must be left as it is."""
    unet, text_encoder = make(), make(1)
    text_encoder.requires_grad_(False)
    ema = EMA({"unet": unet}, decay=0.5, update_interval=1)
    with torch.no_grad():
        unet.lin.weight.add_(1.0)
    ema.update()
    te_before = {n: t.clone() for n, t in text_encoder.state_dict().items()}
    unet_live = unet.lin.weight.detach().clone()
    with ema.swapped_in({"unet": unet, "text_encoder": text_encoder}):
        assert torch.equal(unet.lin.weight, ema.shadow["unet"]["lin.weight"])
        for n, t in text_encoder.state_dict().items():
            assert torch.equal(t, te_before[n]), n
    assert torch.equal(unet.lin.weight, unet_live)
    assert ema.tracked == ("unet",)
    with pytest.raises(KeyError, match=r"EMA tracks \['unet'\]"):
        ema.swapped_in({"text_encoder": text_encoder}).__enter__()
    text_encoder.lin.requires_grad_(True)  # trainable but not averaged: the EMA was built wrongly
    with pytest.raises(RuntimeError, match="'text_encoder' has trainable parameters"):
        ema.swapped_in({"unet": unet, "text_encoder": text_encoder}).__enter__()
    assert torch.equal(unet.lin.weight, unet_live)


def test_copy_to_another_module():
    model = make()
    ema = EMA({"unet": model}, decay=0.0, update_interval=1)
    with torch.no_grad():
        model.lin.weight.fill_(5.0)
    ema.update()  # decay 0: ema == live
    target = make(3)
    ema.copy_to("unet", target)
    assert torch.equal(target.lin.weight, torch.full_like(target.lin.weight, 5.0))
    with pytest.raises(KeyError, match="unet"):
        ema.copy_to("vae", target)


def test_bf16_weights_get_fp32_shadows_that_accumulate_small_updates():
    """With decay 0.999 each update moves the shadow by 0.1 % of the gap: invisible to bf16."""
    model = make().to(torch.bfloat16)
    ema = EMA({"unet": model}, decay=0.999, update_interval=1)
    assert ema.shadow["unet"]["lin.weight"].dtype == torch.float32
    start = ema.shadow["unet"]["lin.weight"].clone()
    with torch.no_grad():
        model.lin.weight.add_(0.01)
    for _ in range(10):
        ema.update()
    moved = ema.shadow["unet"]["lin.weight"] - start
    torch.testing.assert_close(moved, (model.lin.weight.float() - start) * (1 - 0.999**10))
