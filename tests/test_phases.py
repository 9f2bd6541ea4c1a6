"""The phase runner: freezing, stage reuse, resume, bad patterns; loss schedules."""

import math
from functools import partial
from pathlib import Path

import helpers
import lightning as L
import pytest
import torch
from helpers import make_runner

from kvcompress.models import GPTNeoX, ModelConfig
from kvcompress.training import Stage, set_trainable
from kvcompress.training.module import LMModule, loss_weight, make_scheduler

TWO_STAGES = [
    Stage(name="mlp", train=["*.mlp.*"], lr=1e-3, max_epochs=1, patience=None),
    Stage(name="lm", train=["*"], freeze=["*.mlp.*"], lr=1e-3, max_epochs=1, patience=None),
]


def best_ckpt(result):
    return Path(result.weights).parent / "checkpoints" / "best.ckpt"


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(tmp_path):
    runner = make_runner(tmp_path, TWO_STAGES, keep_checkpoints=True)
    before = {k: v.clone() for k, v in runner.net.state_dict().items()}
    results = runner.run()
    after = runner.net.state_dict()
    for name, value in after.items():
        changed = not torch.equal(before[name], value)
        assert changed == ("mlp" in name or "dense" in name or "query" in name or "embed" in name or "norm" in name)
    # Stage 2 froze the MLP: its bytes equal stage 1's best checkpoint, and its optimizer never saw them.
    stage1 = torch.load(best_ckpt(results[0]), weights_only=True)["state_dict"]
    stage2 = torch.load(best_ckpt(results[1]), weights_only=True)
    for name, value in stage1.items():
        if ".mlp." in name:
            assert torch.equal(stage2["state_dict"][name], value), name
    n_trainable_tensors = sum(1 for n, _ in runner.net.named_parameters() if ".mlp." not in n)
    assert len(stage2["optimizer_states"][0]["state"]) == n_trainable_tensors
    assert results[1].frozen_params == sum(p.numel() for n, p in runner.net.named_parameters() if ".mlp." in n)


def test_stage_reuse_hits_on_same_config_and_misses_on_changed(tmp_path):
    first = make_runner(tmp_path, TWO_STAGES).run()
    assert [r.reused for r in first] == [False, False]
    again = make_runner(tmp_path, TWO_STAGES).run()
    assert [r.reused for r in again] == [True, True]
    assert [r.key for r in again] == [r.key for r in first]
    changed = [TWO_STAGES[0], Stage(name="lm", train=["*"], freeze=["*.mlp.*"], lr=5e-4, max_epochs=1, patience=None)]
    third = make_runner(tmp_path, changed).run()
    assert [r.reused for r in third] == [True, False]
    other_model = make_runner(tmp_path, TWO_STAGES, fingerprint={"model": "other"}).run()
    assert [r.reused for r in other_model] == [False, False]
    # A changed first stage changes the key of every later stage.
    assert make_runner(tmp_path, TWO_STAGES).stage_key(TWO_STAGES[1], "x") != first[1].key
    no_reuse = make_runner(tmp_path, TWO_STAGES, reuse=False).run()
    assert [r.reused for r in no_reuse] == [False, False]


class Kill(L.Callback):
    """Simulates a killed run: dies at the start of epoch `at_epoch`, after earlier checkpoints exist."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise SystemExit("killed")


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    stages = [Stage(name="lm", lr=1e-3, max_epochs=3, patience=None)]
    with pytest.raises(SystemExit):
        make_runner(tmp_path, stages, extra_callbacks=lambda: [Kill(at_epoch=2)]).run()
    (folder,) = [p for p in (tmp_path / "stages").iterdir() if p.is_dir()]  # (beside it: its lock file)
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and not (folder / "done.json").exists()
    (result,) = make_runner(tmp_path, stages, keep_checkpoints=True).run()
    assert result.resumed and not result.reused
    assert result.metrics["epochs"] == 3
    final = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 3 * 4  # 32 samples / batch 8 = 4 steps per epoch, none repeated


def test_corrupt_checkpoints_are_retrained_not_loaded(tmp_path, caplog):
    stages = [Stage(name="lm", lr=1e-3, max_epochs=1, patience=None)]
    (first,) = make_runner(tmp_path, stages).run()
    with open(first.weights, "wb") as f:
        f.write(b"not a weights file")
    (again,) = make_runner(tmp_path, stages).run()
    assert not again.reused and not again.resumed
    assert "cannot be trusted" in caplog.text and "weights.safetensors" in caplog.text


def test_bad_patterns_fail_before_training(tmp_path):
    runner = make_runner(tmp_path, [Stage(name="x", train=["*.no_such_param*"])])
    with pytest.raises(ValueError, match="matches no parameter"):
        runner.run()
    assert not (tmp_path / "stages").exists()
    with pytest.raises(ValueError, match="unique"):
        make_runner(tmp_path, [Stage(name="a"), Stage(name="a")])


def test_set_trainable_counts():
    net = GPTNeoX(ModelConfig.from_name("tiny"))
    trainable, frozen = set_trainable(net, Stage(name="s", train=["embed_out.*"]))
    assert trainable == 512 * 64 and frozen == net.num_parameters() - trainable
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["embed_out.weight"]


def old_multiplier(step: int, warmup: int, total: int, min_ratio: float, cosine: bool = True) -> float:
    """The hand-written schedule transformers' replaced (kept here as the reference)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_trace(factory, steps: int, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(factory, optimizer, total)
    trace = []
    for _ in range(steps):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_loss_weight_schedule():
    assert loss_weight(0.5, 0.3) == 0.5
    assert loss_weight({"start": 1.0, "end": 0.0}, 0.25) == pytest.approx(0.75)
    assert loss_weight({"start": 1.0, "end": 0.0}, 2.0) == 0.0


@pytest.mark.parametrize("cosine", [True, False])
def test_transformers_schedule_equals_the_old_multiplier(cosine):
    # After warmup the two are equal to float precision; in warmup transformers' starts at 0 (step s gets the
    # old multiplier of step s - 1): one step later, the same ramp.
    import transformers

    warmup, total = 10, 110
    if cosine:
        factory = partial(
            transformers.get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=warmup, min_lr_rate=0.1
        )
    else:
        factory = partial(transformers.get_constant_schedule_with_warmup, num_warmup_steps=warmup)
    new = lr_trace(factory, total + 1, total)
    old = [old_multiplier(s, warmup, total, 0.1, cosine) for s in range(total + 1)]
    assert new[0] == 0.0
    assert new[1 : warmup + 1] == pytest.approx(old[:warmup], abs=1e-12)
    assert new[warmup:] == pytest.approx(old[warmup:], abs=1e-12)
    assert lr_trace(None, 5, 5) == [1.0] * 5  # no scheduler: constant


def test_nan_loss_stops_with_a_message(tmp_path):
    net = GPTNeoX(ModelConfig.from_name("tiny"))
    with torch.no_grad():
        net.embed_out.weight[0, 0] = float("nan")
    from kvcompress.training import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        make_runner(tmp_path, [Stage(name="lm", max_epochs=1, patience=None)], net=net).run()


def test_stage_hooks_and_stage_callbacks_run_in_order(tmp_path):
    calls = []

    def hook(label):
        return lambda **kw: calls.append((label, kw["stage"].name, type(kw["datamodule"]).__name__)) or {}

    class Seen(L.Callback):
        def on_train_start(self, trainer, pl_module):
            calls.append(("callback", pl_module.metric_prefix, "fit"))

    stages = [
        Stage(name="a", max_epochs=1, patience=None, before=[hook("before")], after=[hook("after")], callbacks=[Seen]),
        Stage(name="b", max_epochs=1, patience=None, validate_before=True),
    ]
    results = make_runner(tmp_path, stages).run()
    assert calls == [("before", "a", "RandomTokens"), ("callback", "a", "fit"), ("after", "a", "RandomTokens")]
    assert "start_val_ppl" in results[1].metrics and "start_val_ppl" not in results[0].metrics
    calls.clear()
    assert all(r.reused for r in make_runner(tmp_path, stages).run())
    assert calls == [("after", "a", "RandomTokens")]  # a reused stage still feeds what comes after it


def test_stage_keys_do_not_depend_on_hook_identity():
    from kvcompress.training.phases import describe

    one = Stage(name="s", after=[partial(print, sep="-")], callbacks=[partial(L.Callback)])
    two = Stage(name="s", after=[partial(print, sep="-")], callbacks=[partial(L.Callback)])
    assert one.key_fields() == two.key_fields()
    assert describe(partial(print, sep="+")) != describe(partial(print, sep="-"))


def test_the_last_epoch_weights_are_recorded_beside_the_best(tmp_path):
    """`final_val_*` and `windows_final.safetensors` are the weights the fit ended with (its last.ckpt), not the
    best ones that the stage keeps; a reused stage keeps them."""
    from safetensors.torch import load_file

    from kvcompress.models.weights import load_weights
    from kvcompress.training.module import token_cross_entropy
    from kvcompress.training.phases import FINAL_WINDOWS

    stages = [Stage(name="lm", lr=3e-2, max_epochs=3, patience=None)]  # a high lr: the last epoch is not the best
    runner = make_runner(tmp_path, stages)
    runner.keep_checkpoints = True  # checkpoint.keep_finished: its last.ckpt is the reference below
    (result,) = runner.run()
    folder = Path(result.weights).parent
    windows = load_file(str(folder / FINAL_WINDOWS))
    net = GPTNeoX(ModelConfig.from_name("tiny"))
    val = helpers.RandomTokens().val
    for which, ckpt in (("final_", folder / "checkpoints" / "last.ckpt"), ("", folder / "weights.safetensors")):
        net.load_state_dict(load_weights(ckpt))
        with torch.no_grad():
            losses = token_cross_entropy(net.eval()(val[:, :-1]), val[:, 1:]).double()
        assert result.metrics[f"{which}val_ppl"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
        if which:
            torch.testing.assert_close(windows["val"], losses.mean(dim=1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(windows["bucket:0-16"], losses[:, :16].mean(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(windows["ids"], torch.arange(len(val)))
    assert result.metrics["final_epoch"] == 3 and result.metrics["stopped_early"] == 0
    assert result.metrics["final_val_ppl"] != result.metrics["val_ppl"]
    (again,) = make_runner(tmp_path, stages).run()
    assert again.reused and again.metrics["final_val_ppl"] == result.metrics["final_val_ppl"]


@pytest.mark.parametrize(("max_steps", "max_epochs", "steps"), [(3, 1, 3), (4, 2, 4), (0, 1, 0)])
def test_a_step_budget_limits_the_batches_of_each_epoch(tmp_path, max_steps, max_epochs, steps):
    """RandomTokens: 4 batches an epoch; `max_steps` spreads a budget over the epochs (0: validation only)."""
    runner = make_runner(
        tmp_path, [Stage(name="lm", lr=1e-3, max_epochs=max_epochs, max_steps=max_steps, patience=None)]
    )
    before = {k: v.clone() for k, v in runner.net.state_dict().items()}
    (result,) = runner.run()
    assert result.metrics["steps"] == steps
    unchanged = all(torch.equal(before[k], v) for k, v in runner.net.state_dict().items())
    assert unchanged == (steps == 0) and math.isfinite(result.metrics["val_loss"])
    with pytest.raises(ValueError, match=r"phase.stages.lm.max_steps must be an integer >= 0, got -1"):
        Stage(name="lm", max_steps=-1)


def test_the_compile_setting_leaves_nn_module_compile_a_method():
    """`LMModule(compile=True)` keeps `nn.Module.compile()` a method (the setting once replaced it with a bool)."""
    module = LMModule(GPTNeoX(ModelConfig.from_name("tiny")), partial(torch.optim.AdamW, lr=1e-3), compile=True)
    assert callable(module.compile) and module.compile_net is True
