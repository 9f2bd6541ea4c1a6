"""Stage folders and checkpoints: no code runs from any file we load, damage is detected and repaired, reuse is
verified, folders move, a lock keeps a second process out."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import make_runner
from safetensors.torch import save_file

from kvcompress.models import GPTNeoX, ModelConfig, build_model
from kvcompress.models.weights import BadWeightsError
from kvcompress.training import Stage
from kvcompress.training.checkpoints import StageLock, StageLockedError, lock_path

ONE_STAGE = [Stage(name="lm", lr=1e-3, max_epochs=2, patience=None)]


class Payload:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a Lightning-looking checkpoint whose unpickling runs code, the file that code would create)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"net.embed_in.weight": Payload(marker)}, "epoch": 0}, path)
    return path, marker


def stage_folder(tmp_path, stages=ONE_STAGE, index=0) -> Path:
    runner = make_runner(tmp_path, stages)
    key = "init"
    for stage in stages[: index + 1]:
        key = runner.stage_key(stage, key)
    return (tmp_path / "stages" / f"{stages[index].name}-{key}").resolve()


# --- attacks: a malicious pickle through every path the library loads from -------------------------------------


def test_the_payload_does_run_code_when_unpickled_unsafely(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # the baseline: this is what an unsafe load does
    assert marker.exists()


def test_init_from_checkpoint_runs_no_code(evil):
    path, marker = evil
    with pytest.raises(BadWeightsError, match="evil.ckpt"):
        build_model("tiny", init_from=str(path))
    assert not marker.exists()


def test_stage_init_checkpoint_runs_no_code(tmp_path, evil):
    path, marker = evil
    with pytest.raises(BadWeightsError, match="evil.ckpt"):
        make_runner(tmp_path, [Stage(name="lm", lr=1e-3, max_epochs=1, patience=None, init=str(path))]).run()
    assert not marker.exists()


def test_planted_last_checkpoint_runs_no_code_and_the_stage_trains_from_its_start(tmp_path, evil, caplog):
    path, marker = evil
    folder = stage_folder(tmp_path)
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(path, folder / "checkpoints" / "last.ckpt")
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not marker.exists()
    assert not result.resumed and "damaged checkpoint" in caplog.text and "last.ckpt" in caplog.text


@pytest.mark.parametrize("where", ["outside", "absolute", "pickle_inside"])
def test_planted_done_json_runs_no_code_and_is_not_followed(tmp_path, evil, caplog, where):
    path, marker = evil
    folder = stage_folder(tmp_path)
    folder.mkdir(parents=True)
    from kvcompress.utils import file_sha256

    if where == "pickle_inside":  # a pickle named like the weights, with the right hash
        shutil.copy(path, folder / "weights.safetensors")
        name, digest = "weights.safetensors", file_sha256(path)
    else:
        name = "../../evil.ckpt" if where == "outside" else str(path)
        digest = file_sha256(path)
    (folder / "done.json").write_text(json.dumps({"weights": name, "weights_sha256": digest, "metrics": {}}))
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not marker.exists()
    assert not result.reused and "cannot be trusted" in caplog.text


def test_hf_directory_with_a_pickled_bin_runs_no_code(tmp_path, evil):
    path, marker = evil
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    from kvcompress.models.hf import config_to_hf

    config_to_hf(ModelConfig.from_name("tiny")).save_pretrained(hf_dir)
    shutil.copy(path, hf_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no base weights"):
        build_model("tiny", init_from=str(hf_dir))
    assert not marker.exists()


def test_planted_token_cache_runs_no_code(tmp_path, caplog):
    from kvcompress.data.sources import SplitSource, cache_path, load_tokens

    marker = tmp_path / "code-ran"
    split = SplitSource("t", "train", "test", {"x": 1}, False, lambda: "hello world " * 50)
    tok = _tiny_tokenizer()
    path = cache_path(split, tok, tmp_path)
    path.parent.mkdir(parents=True)
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    path.with_suffix(".json").write_text(json.dumps({"num_tokens": 1, "dtype": "object", "tokens_sha256": "x"}))
    tokens, cached = load_tokens(split, tok, tmp_path)
    assert not marker.exists() and not cached and tokens.size > 0
    assert "damaged" in caplog.text and str(path) in caplog.text


# --- damage: detected, named and repaired ------------------------------------------------------------------------


def test_random_bytes_in_finished_weights_are_detected_and_the_stage_retrained(tmp_path, caplog):
    (first,) = make_runner(tmp_path, ONE_STAGE).run()
    with open(first.weights, "r+b") as f:
        f.seek(2048)
        f.write(os.urandom(4096))
    (again,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not again.reused and "weights.safetensors" in caplog.text and "sha256" in caplog.text
    assert again.metrics == first.metrics  # retrained to the same result
    assert make_runner(tmp_path, ONE_STAGE).run()[0].reused  # and the repaired folder is reused again


def test_reused_metrics_are_recomputed_not_copied(tmp_path):
    (first,) = make_runner(tmp_path, ONE_STAGE).run()
    done_file = Path(first.weights).parent / "done.json"
    done = json.loads(done_file.read_text())
    done["metrics"]["val_ppl"] = done["metrics"]["val_loss"] = 1.0  # a tampered record, weights intact
    done_file.write_text(json.dumps(done))
    (again,) = make_runner(tmp_path, ONE_STAGE).run()
    assert again.reused
    assert again.metrics["val_ppl"] == pytest.approx(first.metrics["val_ppl"], rel=1e-6) != 1.0


def test_garbled_done_json_is_retrained(tmp_path, caplog):
    (first,) = make_runner(tmp_path, ONE_STAGE).run()
    (Path(first.weights).parent / "done.json").write_text("{not json")
    (again,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not again.reused and "done.json" in caplog.text


class Stop(L.Callback):
    """Stops a run (as a kill would) at the start of epoch 1, after epoch 0's checkpoints exist."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise SystemExit("killed")


def interrupted_folder(tmp_path) -> Path:
    with pytest.raises(SystemExit):
        make_runner(tmp_path, ONE_STAGE, extra_callbacks=lambda: [Stop()]).run()
    return stage_folder(tmp_path) / "checkpoints"


def test_truncated_best_with_intact_last_restarts_the_stage(tmp_path, caplog):
    (clean,) = make_runner(tmp_path / "clean", ONE_STAGE).run()
    ckpts = interrupted_folder(tmp_path)
    data = (ckpts / "best.ckpt").read_bytes()
    (ckpts / "best.ckpt").write_bytes(data[: len(data) // 2])
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not result.resumed and "best.ckpt" in caplog.text
    assert result.metrics == clean.metrics


def test_last_checkpoint_holding_nan_restarts_the_stage(tmp_path, caplog):
    (clean,) = make_runner(tmp_path / "clean", ONE_STAGE).run()
    ckpts = interrupted_folder(tmp_path)
    checkpoint = torch.load(ckpts / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["net.embed_in.weight"][0, 0] = float("nan")
    torch.save(checkpoint, ckpts / "last.ckpt")
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not result.resumed and "NaN" in caplog.text and "last.ckpt" in caplog.text
    assert result.metrics == clean.metrics


def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path):
    (clean,) = make_runner(tmp_path / "clean", ONE_STAGE).run()
    interrupted_folder(tmp_path)
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    assert result.resumed and result.metrics == clean.metrics


def test_stale_temp_files_are_removed_on_the_next_start(tmp_path, caplog):
    ckpts = interrupted_folder(tmp_path)
    stale = ckpts / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    make_runner(tmp_path, ONE_STAGE).run()
    assert not stale.exists() and "temp files" in caplog.text


def test_non_finite_weights_are_an_error_naming_the_file(tmp_path):
    state = GPTNeoX(ModelConfig.from_name("tiny")).state_dict()
    state["embed_out.weight"][1, 2] = float("inf")
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(BadWeightsError, match=r"bad\.safetensors.*embed_out\.weight"):
        build_model("tiny", init_from=str(path))


def test_a_second_process_cannot_train_a_locked_stage(tmp_path):
    folder = stage_folder(tmp_path)
    with StageLock(folder, "lm"):  # another owner holds it (flock: a second open is another owner)
        with pytest.raises(StageLockedError, match=rf"pid {os.getpid()}"):
            make_runner(tmp_path, ONE_STAGE).run()
    (result,) = make_runner(tmp_path, ONE_STAGE).run()  # released: trains
    assert not result.reused


def test_stage_folders_move_and_copies_use_their_own_files(tmp_path):
    (first,) = make_runner(tmp_path / "a", ONE_STAGE).run()
    shutil.move(tmp_path / "a" / "stages", tmp_path / "b" / "stages")
    (moved,) = make_runner(tmp_path / "b", ONE_STAGE).run()
    assert moved.reused and moved.metrics["val_ppl"] == pytest.approx(first.metrics["val_ppl"], rel=1e-6)
    shutil.copytree(tmp_path / "b" / "stages", tmp_path / "c" / "stages")
    for weights in (tmp_path / "b" / "stages").rglob("weights.safetensors"):
        weights.write_bytes(b"damaged original")
    (copied,) = make_runner(tmp_path / "c", ONE_STAGE).run()
    assert copied.reused and Path(copied.weights).is_relative_to((tmp_path / "c").resolve())


def test_an_interrupted_stage_resumes_after_its_folder_moved(tmp_path):
    (clean,) = make_runner(tmp_path / "clean", ONE_STAGE).run()
    interrupted_folder(tmp_path / "a")
    shutil.move(tmp_path / "a" / "stages", tmp_path / "b" / "stages")
    (result,) = make_runner(tmp_path / "b", ONE_STAGE).run()
    assert result.resumed and result.metrics == clean.metrics


def test_one_best_file_per_stage(tmp_path):
    interrupted_folder(tmp_path)
    (result,) = make_runner(tmp_path, ONE_STAGE, keep_checkpoints=True).run()
    names = sorted(p.name for p in (Path(result.weights).parent / "checkpoints").iterdir())
    assert names == ["best.ckpt", "last.ckpt"]


def test_a_finished_stage_keeps_one_copy_of_its_weights(tmp_path):
    """The checkpoints go once done.json is written; a folder left with both (a run stopped in between) is
    cleaned on reuse; the lock keeps its last owner's pid."""
    interrupted_folder(tmp_path)
    (result,) = make_runner(tmp_path, ONE_STAGE).run()
    folder = Path(result.weights).parent
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "weights.safetensors", "windows_final.safetensors"]
    assert lock_path(folder).read_text().strip() == str(os.getpid())  # beside the folder
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"left behind")
    (again,) = make_runner(tmp_path, ONE_STAGE).run()
    assert again.reused and not (folder / "checkpoints").exists()


# --- the token cache ----------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from kvcompress.data.tokenizer import TextTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator(["hello world the cache key value"] * 20, trainer)
    return TextTokenizer(tok, "tiny", "test")


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "random", "no_metadata"])
def test_damaged_token_cache_is_named_and_rebuilt(tmp_path, caplog, damage):
    from kvcompress.data.sources import SplitSource, cache_path, load_tokens

    split = SplitSource("t", "train", "test", {"x": 1}, False, lambda: "hello world the cache " * 200)
    tok = _tiny_tokenizer()
    fresh, cached = load_tokens(split, tok, tmp_path)
    assert not cached and load_tokens(split, tok, tmp_path)[1]  # the second read hits the cache
    path = cache_path(split, tok, tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "zeroed":
        path.write_bytes(data[:128] + bytes(len(data) - 128))  # header intact, tokens zeroed
    elif damage == "random":
        path.write_bytes(os.urandom(len(data)))
    else:
        path.with_suffix(".json").unlink()
    caplog.set_level(logging.WARNING)
    tokens, cached = load_tokens(split, tok, tmp_path)
    assert not cached and np.array_equal(tokens, fresh)
    assert "damaged" in caplog.text and str(path) in caplog.text
    assert load_tokens(split, tok, tmp_path)[1]  # rebuilt and trusted again
