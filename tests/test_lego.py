"""LEGO: exits, routing, mining, calibration, early-exit and self-speculative decoding, the phase end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import random_ids, randomized
from hydra.errors import InstantiationException
from safetensors.torch import load_file
from test_train import smoke
from test_train import text_file as text_file  # a fixture

from kvcompress.methods.lego import (
    LegoGPTNeoX,
    build_lego,
    calibrate_threshold,
    compute_cost,
    confidence,
    hard_mask,
    hard_windows,
)
from kvcompress.methods.lego_decode import generate_early_exit, generate_self_speculative
from kvcompress.models import GPTNeoX, ModelConfig, generate
from kvcompress.run import train
from kvcompress.training.module import weighted_mean

CFG = ModelConfig.from_name("tiny", n_layer=4)


def lego_model(seed: int = 0, dtype=torch.float64) -> LegoGPTNeoX:
    torch.manual_seed(seed)
    return randomized(LegoGPTNeoX(CFG, exits=(2, 4)), std=0.2, seed=seed, dtype=dtype)


def plain_from(model: LegoGPTNeoX, depth: str) -> GPTNeoX:
    """A plain GPT-NeoX holding the LEGO model's weights: all layers ("deep"), or the shallow model of phase 1."""
    state = model.state_dict()
    layers = model.shallow_exit if depth == "shallow" else model.deep_exit
    plain = GPTNeoX(CFG.with_(n_layer=layers)).to(model.embed_out.weight.dtype)
    mapped = {"embed_in.weight": state["embed_in.weight"]}
    for i in range(layers):
        src = f"shallow_layers.{i}" if i < model.shallow_exit else f"deep_layers.{i - model.shallow_exit}"
        mapped |= {f"layers.{i}.{k[len(src) + 1 :]}": v for k, v in state.items() if k.startswith(src + ".")}
    head = {"shallow": "shallow_head.norm", "deep": "final_layer_norm"}[depth]
    out = {"shallow": "shallow_head.out", "deep": "embed_out"}[depth]
    mapped |= {f"final_layer_norm.{p}": state[f"{head}.{p}"] for p in ("weight", "bias")}
    mapped["embed_out.weight"] = state[f"{out}.weight"]
    plain.load_state_dict(mapped, strict=True)
    return plain.eval()


def stage(metrics: dict, name: str) -> dict:
    return next(s for s in metrics["stages"] if s["name"] == name)


def test_all_deep_is_the_full_model_and_all_shallow_is_the_stage1_model():
    model, ids = lego_model(), random_ids(3, 12)
    deep, take = model.routed(ids, threshold=1.0)
    assert not take.any()
    assert torch.equal(deep, model(ids))
    torch.testing.assert_close(deep, plain_from(model, "deep")(ids), rtol=0, atol=1e-12)
    shallow, take = model.routed(ids, threshold=0.0)
    assert take.all()
    torch.testing.assert_close(shallow, plain_from(model, "shallow")(ids), rtol=0, atol=1e-12)
    mixed, take = model.routed(ids, threshold=float(confidence(shallow).median().detach()))
    assert take.any() and (~take).any()
    assert torch.equal(mixed[take], shallow[take]) and torch.equal(mixed[~take], deep[~take])


def test_forward_exits_stops_at_the_exit_it_needs():
    model, calls = lego_model(), []
    for block in model.deep_layers:
        block.register_forward_hook(lambda *a: calls.append(1))
    out = model.forward_exits(random_ids(2, 5), upto=2)
    assert list(out) == [2] and not calls
    assert list(model.forward_exits(random_ids(2, 5))) == [2, 4] and len(calls) == 2


def test_phase2_extends_the_phase1_model():
    from kvcompress.training.lego import extend_from_shallow

    model, ids = lego_model(), random_ids(2, 6)
    with torch.no_grad():
        for p in model.deep_layers.parameters():
            p.zero_()  # added layers that add nothing: the deep exit is then the phase-1 model
    extend_from_shallow(runner=None, stage=None, net=model, datamodule=None)
    out = model.forward_exits(ids)
    torch.testing.assert_close(out[4], out[2], rtol=0, atol=1e-12)


def test_threshold_is_a_buffer_checkpoints_carry():
    model = lego_model()
    model.threshold.fill_(0.25)
    again = LegoGPTNeoX(CFG, exits=(2, 4))
    again.load_state_dict(model.state_dict())
    assert float(again.threshold) == 0.25
    assert "threshold" in model.state_dict() and "threshold" not in dict(model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("shallow_layers.1.") for n in names) and any(n.startswith("deep_layers.1.") for n in names)
    assert not any(n.startswith("layers.") for n in names)  # each block registered once


def test_mining_is_reproducible_with_an_exact_ratio():
    conf = torch.rand(37, 13, generator=torch.Generator().manual_seed(0))
    conf[0, :5] = 0.5  # ties are broken by position
    for ratio in (0.1, 0.5, 0.73):
        mask = hard_mask(conf, ratio)
        assert int(mask.sum()) == round(ratio * conf.numel())
        assert torch.equal(mask, hard_mask(conf.clone(), ratio))
        assert conf[mask].max() <= conf[~mask].min()
    windows = hard_windows(conf, 0.5)
    assert len(windows) == round(0.5 * 37)
    assert conf.mean(1)[windows].max() <= conf.mean(1)[[i for i in range(37) if i not in windows.tolist()]].min()


def test_threshold_routes_the_asked_share_and_cost_formula():
    conf = torch.rand(4000, generator=torch.Generator().manual_seed(1))
    for ratio in (0.2, 0.5, 0.9):
        threshold = calibrate_threshold(conf, ratio)
        assert int((conf < threshold).sum()) == round(ratio * conf.numel())
    assert compute_cost(0.704, 2, 4) == pytest.approx(0.648)  # the report's 64.8%
    assert compute_cost(1.0, 2, 4) == 0.5 and compute_cost(0.0, 2, 4) == 1.0


def test_weighted_loss_is_the_mean_over_weighted_tokens():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert weighted_mean(losses, weight) == pytest.approx((1 + 3 + 6) / 3)
    assert weighted_mean(losses) == pytest.approx(3.5)
    assert weighted_mean(losses, torch.zeros_like(losses)) == 0


@pytest.mark.parametrize("fill", ["recompute", "propagate"])
def test_early_exit_with_every_token_deep_is_full_depth_decoding(fill):
    model, prompt = lego_model(), random_ids(3, 5)
    tokens, logits = generate(model, prompt, 10, return_logits=True)
    out = generate_early_exit(model, prompt, 10, threshold=1.0, fill=fill, return_logits=True)
    assert not out.shallow.any()
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)


@torch.no_grad()
def routed_reference(model: LegoGPTNeoX, prompt: torch.Tensor, new_tokens: int, threshold: float):
    """Uncached: each step runs the whole sequence at full depth and takes the routed last-position logits. Also
    returns each step's shallow confidence (for the margin to the threshold)."""
    tokens, steps, shallow, confidences = prompt, [], [], []
    for _ in range(new_tokens):
        logits, take = model.routed(tokens, threshold)
        steps.append(logits[:, -1])
        shallow.append(take[:, -1])
        confidences.append(confidence(model.forward_exits(tokens)[model.shallow_exit][:, -1]))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(steps, 1), torch.stack(shallow, 1), torch.stack(confidences, 1)


@torch.no_grad()
def mixed_threshold(model: LegoGPTNeoX, prompt: torch.Tensor, new_tokens: int) -> float:
    """Midway between the two shallow confidences next to the median over the steps of full-depth decoding: it
    routes about half of them deep, and no confidence sits on it (the cached and uncached paths may differ in the
    last bit of a confidence, so a threshold on a data point would route that token by the CPU's rounding)."""
    tokens = generate(model, prompt, new_tokens)
    shallow = model.forward_exits(tokens[:, :-1], upto=model.shallow_exit)[model.shallow_exit]
    ordered = confidence(shallow[:, prompt.shape[1] - 1 :]).flatten().double().sort().values
    middle = ordered.numel() // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


MARGIN = 1e-6  # every confidence on a compared path is at least this far from the threshold (no tie to round)


def test_recompute_with_mixed_routes_equals_the_uncached_reference():
    model, prompt = lego_model(), random_ids(4, 6)
    threshold = mixed_threshold(model, prompt, 12)
    tokens, logits, shallow, confidences = routed_reference(model, prompt, 12, threshold)
    assert (confidences - threshold).abs().min() >= MARGIN  # precondition: no step is a tie
    out = generate_early_exit(model, prompt, 12, threshold=threshold, fill="recompute", return_logits=True)
    assert torch.equal(out.shallow, shallow)
    mixed_steps = (out.shallow.any(0) & (~out.shallow).any(0)).sum()
    assert mixed_steps > 0 and out.shallow.any() and (~out.shallow).any()  # batch > 1, exits mixed within steps
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fill", ["recompute", "propagate"])
def test_early_exit_rows_decode_alike_alone_and_in_a_mixed_batch(fill):
    model, prompt = lego_model(seed=1), random_ids(4, 6, seed=1)
    threshold = mixed_threshold(model, prompt, 10)
    batch = generate_early_exit(model, prompt, 10, threshold=threshold, fill=fill, return_logits=True)
    assert batch.shallow.any() and (~batch.shallow).any()
    with torch.no_grad():  # precondition: along the tokens taken, no shallow confidence is a tie with the threshold
        shallow = model.forward_exits(batch.tokens[:, :-1], upto=model.shallow_exit)[model.shallow_exit]
    assert (confidence(shallow[:, prompt.shape[1] - 1 :]) - threshold).abs().min() >= MARGIN
    for row in range(4):
        alone = generate_early_exit(
            model, prompt[row : row + 1], 10, threshold=threshold, fill=fill, return_logits=True
        )
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=0, atol=1e-10)


def test_propagate_fills_skipped_layers_from_the_exit_hidden_state():
    """After an all-shallow step, each skipped layer holds its own K/V projection of the exit hidden state."""
    model, prompt = lego_model(), random_ids(2, 4)
    caches = model.build_caches(2, 6)
    out = generate_early_exit(model, prompt, 2, threshold=0.0, fill="propagate", caches=caches)
    assert out.shallow.all() and caches.state.length == 5
    ids = out.tokens[:, :5]
    h = model.run_layers(*model.embed(ids), layers=slice(0, 2))[:, -1:]  # the exit hidden state at position 4
    for i in (2, 3):
        layer = model.layers[i]
        _, k, v = layer.attention.split_qkv(layer.input_layernorm(h), model.rope(torch.tensor([4]), h))
        torch.testing.assert_close(caches[i].buffers["k"][:, :, 4:5], k, rtol=0, atol=1e-12)
        torch.testing.assert_close(caches[i].buffers["v"][:, :, 4:5], v, rtol=0, atol=1e-12)


def test_self_speculative_tokens_are_the_full_greedy_tokens():
    model = lego_model(seed=2)
    with torch.no_grad():  # deep layers close to identity and a shared head: drafts are often, not always, right
        for p in model.deep_layers.parameters():
            p.mul_(0.4)
        model.shallow_head.load_state_dict({"norm.weight": model.final_layer_norm.weight,
                                            "norm.bias": model.final_layer_norm.bias,
                                            "out.weight": model.embed_out.weight})  # fmt: skip
    accepted = drafted = 0
    for B, draft in ((1, 1), (1, 3), (3, 4), (2, 6)):
        prompt = random_ids(B, 5, seed=B)
        full = generate(model, prompt, 17)
        spec = generate_self_speculative(model, prompt, 17, draft_tokens=draft)
        assert torch.equal(spec.tokens, full), (B, draft)
        accepted, drafted = accepted + spec.accepted, drafted + spec.drafted
    assert 0.2 < accepted / drafted < 0.9  # both acceptance and rollback were exercised


def test_bad_input_names_the_setting():
    with pytest.raises(ValueError, match="strictly increasing"):
        LegoGPTNeoX(CFG, exits=(3, 2))
    with pytest.raises(ValueError, match="past n_layer"):
        LegoGPTNeoX(CFG, exits=(2, 6))
    with pytest.raises(ValueError, match="threshold"):
        LegoGPTNeoX(CFG, exits=(2, 4), threshold=1.5)
    with pytest.raises(ValueError, match="hard_example_ratio"):
        hard_mask(torch.rand(4), 1.0)
    model = lego_model()
    with pytest.raises(ValueError, match="threshold"):
        generate_early_exit(model, random_ids(1, 3), 2, threshold=-0.1)
    with pytest.raises(ValueError, match="cannot be filled"):
        generate_early_exit(model, random_ids(1, 3), 2, fill="propagate", cache="ka_plain")
    generate_early_exit(model, random_ids(1, 3), 2, fill="recompute", cache="ka_plain")  # recompute runs them
    assert build_lego(overrides={"n_layer": 2, "n_embd": 64, "n_head": 4}).exits == (1, 2)


def test_bad_phase_settings_fail_before_training(tmp_path, text_file):
    for override, match in (
        ("phase.hard_example_ratio=1.5", "hard_example_ratio"),
        ("phase.selection=random", "selection"),
        ("model.exits=[2,4]", "past n_layer"),
        ("model.threshold=2", "threshold"),
        ("cache=ka_plain", "cannot be filled"),
    ):
        with pytest.raises((ValueError, InstantiationException), match=match):
            train(smoke(tmp_path, text_file, "model=lego", "phase=lego", override))
    assert not (tmp_path / "stages").exists()


LIGHT_BENCH = ["eval.extra.lego_decode.prompts=2", "eval.extra.lego_decode.repeats=1"]


def test_lego_phase_smoke(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=lego", "phase=lego", *LIGHT_BENCH))
    shallow, deep = stage(metrics, "shallow"), stage(metrics, "deep")
    assert shallow["hard_share_train"] == 0.5 and shallow["hard_ppl_before"] > 1 and not shallow["mining_reused"]
    assert deep["shallow_ratio"] == pytest.approx(0.5, abs=0.02)  # calibrated on these validation tokens
    assert deep["compute_cost"] == pytest.approx(compute_cost(deep["shallow_ratio"], 1, 2))
    for key in ("val_ppl_routed", "val_ppl_shallow", "val_ppl_deep", "hard_ppl_after", "val_acc_routed"):
        assert deep[key] > 0, key
    assert deep["val_ppl_shallow"] == pytest.approx(shallow["val_ppl"], rel=1e-4)  # the shallow part is frozen
    weights = load_file(deep["weights"])
    assert float(weights["threshold"]) == pytest.approx(deep["threshold"])
    first = load_file(shallow["weights"])
    frozen = [k for k in first if k.split(".")[0] in ("embed_in", "shallow_layers", "shallow_head")]
    assert frozen and all(torch.equal(first[k], weights[k]) for k in frozen)
    decode = metrics["lego_decode"]
    assert decode["self_speculative"]["same_tokens_as_full"] == 1.0
    assert decode["full_tokens_per_s"] > 0 and decode["recompute"]["tokens_per_s"] > 0
    assert 0 <= decode["propagate"]["shallow_share"] <= 1
    assert "deep/hard_ppl_after" in (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stage(saved, "deep")["threshold"] == deep["threshold"]

    # A second run reuses both stages and the mining; sample-level selection retrains only the deep stage.
    again = train(smoke(tmp_path, text_file, "model=lego", "phase=lego", *LIGHT_BENCH))
    assert stage(again, "shallow")["reused"] and stage(again, "shallow")["mining_reused"]
    assert stage(again, "deep")["reused"] and stage(again, "deep")["threshold"] == deep["threshold"]
    sample = train(smoke(tmp_path, text_file, "model=lego", "phase=lego", "phase.selection=sample", *LIGHT_BENCH))
    assert stage(sample, "shallow")["reused"] and not stage(sample, "deep")["reused"]
    assert stage(sample, "deep")["hard_windows"] == round(0.5 * 86)

    # Report 002's order: the threshold from the mining (phase 1), the shallow layers trained in phase 2; the
    # calibration file pairs hard-token losses before and after, token by token.
    report = train(
        smoke(tmp_path, text_file, "model=lego", "phase=lego", "phase.threshold_from=mining", *LIGHT_BENCH,
              "phase.stages.deep.train=[*]", "phase.stages.deep.freeze=[shallow_head.*]")
    )  # fmt: skip
    after = stage(report, "deep")
    mining = load_file(str(Path(shallow["weights"]).parent / "hard_examples.safetensors"))
    assert after["threshold"] == pytest.approx(calibrate_threshold(mining["val_confidence"], 0.5))
    assert after["threshold_from"] == "mining" and after["val_ppl_shallow"] != pytest.approx(shallow["val_ppl"])
    calibration = load_file(str(Path(after["weights"]).parent / "calibration.safetensors"))
    hard = mining["val_hard"].bool()
    assert calibration["val_loss_deep"].shape == hard.shape
    assert math.exp(calibration["val_loss_deep"][hard].double().mean()) == pytest.approx(after["hard_ppl_after"])
    assert calibration["val_take_shallow"].float().mean().item() == pytest.approx(after["shallow_ratio"])


def test_token_weights_follow_their_windows(tmp_path, text_file):
    from kvcompress.data import TokenWindowDataModule

    dm = TokenWindowDataModule(
        source="local", path=str(text_file), seq_len=8, num_samples=20, batch_size=4, cache_dir=tmp_path
    )
    dm.setup("fit")
    n = len(dm.base_train_dataset)
    weights = torch.arange(n * 8, dtype=torch.float32).view(n, 8)
    dm.set_train_weights(weights)
    batch = next(iter(dm.train_dataloader(shuffle=False)))
    assert torch.equal(batch["weight"], weights[:4])
    assert torch.equal(batch["ids"], torch.stack([dm.base_train_dataset[i] for i in range(4)]))
    dm.set_train_indices([2, 0])
    assert torch.equal(next(iter(dm.train_dataloader(shuffle=False)))["weight"], weights[[2, 0]])
    dm.set_train_weights(None)
    dm.set_train_indices(None)
    assert isinstance(next(iter(dm.train_dataloader())), torch.Tensor)
    with pytest.raises(ValueError, match="token weights"):
        dm.set_train_weights(torch.ones(n, 3))
