"""A run folder from someone else is data, never code; a failed retrain never destroys a finished stage; reuse is
keyed by file contents; every bad input fails before work in one line (issue 17). Each test asserts what is
refused and that nothing ran or changed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_runner, train_tokenizer
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from kvcompress.run import CONF_DIR, INPUT_ERRORS, one_line, prepare, run_guarded, train_stages
from kvcompress.training import Stage
from kvcompress.training.phases import DONE, FRESH, REPLACED, finish_interrupted_swap, sibling
from kvcompress.utils import file_sha256

REPO = Path(__file__).resolve().parent.parent
WORDS = "the of a model cache key value attention token layer train data loss head rank".split()
OTHER_WORDS = "red green blue north south east west stone water fire wind light dark".split()


def corpus_text(words: list[str], seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(40)) + " ." for _ in range(200))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small corpus and a tiny tokenizer trained on it (`tokenizer.json` beside it): no offline data needed."""
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(WORDS))
    train_tokenizer(path.read_text().splitlines()[:50], tmp_path / "tokenizer.json", vocab_size=300)
    return path


def compose_cfg(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.stage_dir = str(tmp_path / "stages")
        del cfg["hydra"]  # (as under @hydra.main: the run's config holds no hydra node)
    return cfg


def smoke(tmp_path: Path, text_file: Path, *extra: str):
    tokenizer = text_file.with_name("tokenizer.json")
    return compose_cfg(
        [
            "debug=smoke",
            "data=local",
            f"data.path={text_file}",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logger=none",
            *extra,
        ],
        tmp_path,
    )


def run_cli(module: str, args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVCOMPRESS_CACHE_DIR": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd, **kwargs)


# --- 1. a run folder is data, never code ----------------------------------------------------------------------------


class Payload:
    """Unpickling it creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Another run's folder, whose metrics.json a planted folder tries to overwrite."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"val_ppl": 12.5, "stages": []}))
    return folder


def plant(tmp_path: Path, overrides: list, name: str = "planted") -> Path:
    """A run folder whose metrics.json records `overrides` after a normal run's (and names weights that exist)."""
    folder = tmp_path / name
    folder.mkdir()
    weights = folder / "weights.safetensors"
    weights.write_bytes(b"")
    normal = ["debug=smoke", "data=local", "data.path=/data/corpus.txt", "logger=csv", "print_config=false"]
    record = {"overrides": [*normal, *overrides], "stages": [{"name": "lm", "weights": str(weights)}]}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def planted_cases(tmp_path: Path, marker: Path, victim: Path) -> dict[str, tuple[list, str]]:
    """name -> (recorded overrides, the one refused)."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload(marker)))
    touch = f"'touch {marker}'"
    return {
        "torch.load": (
            ["+callbacks.pwn._target_=torch.load", f"+callbacks.pwn.f={evil}", "+callbacks.pwn.weights_only=false"],
            "+callbacks.pwn._target_=torch.load",
        ),
        "file write": (
            [
                "+callbacks.pwn._target_=kvcompress.utils.atomic_write_text",
                f"+callbacks.pwn.path={victim / 'metrics.json'}",
                "+callbacks.pwn.text=pwned",
            ],
            "+callbacks.pwn._target_=kvcompress.utils.atomic_write_text",
        ),
        "output dir (++)": ([f"++paths.output_dir={victim}"], f"++paths.output_dir={victim}"),
        "output dir (+)": ([f"+paths.output_dir={victim}"], f"+paths.output_dir={victim}"),
        "os.system": (["+callbacks.pwn._target_=os.system", f"+callbacks.pwn.command={touch}"], "os.system"),
        "list value": (
            [f"phase.stages.lm.after=[{{_target_: os.system, command: {touch}}}]"],
            "phase.stages.lm.after=",
        ),
        "dict value": (["+eval.extra.pwn={_target_: os.system}"], "+eval.extra.pwn="),
        "quoted target": (["+callbacks.pwn._target_='os.system'"], "_target_='os.system'"),
        "double-quoted target": (['++callbacks.pwn._target_="torch.load"'], '_target_="torch.load"'),
        "whole override quoted": (["'+callbacks.pwn._target_=torch.load'"], "'+callbacks.pwn._target_=torch.load'"),
        "partial": (["model._partial_=true"], "model._partial_=true"),
        "recursive": (["+data._recursive_=false"], "+data._recursive_=false"),
        "interpolation": (["data.path=${oc.env:HOME}"], "data.path=${oc.env:HOME}"),
        "escaped interpolation": (["model.name=\\${oc.env:HOME}"], "model.name="),
        "search path": (["+hydra.searchpath=[file:///tmp]"], "+hydra.searchpath="),
        "deleted callback": (["~callbacks.position_ppl"], "~callbacks.position_ppl"),
        "group outside conf": (["experiment=../../../tmp/evil"], "experiment=../../../tmp/evil"),
        "group not ours": (["experiment=evil"], "experiment=evil"),
        "package": (["model@pwn=pythia-14m"], "model@pwn=pythia-14m"),
        "sweep": (["seed=1,2"], "seed=1,2"),
        "unknown key": (["+pwn=1"], "+pwn=1"),
        "not a string": ([{"_target_": "os.system"}], "_target_"),
    }


CASES = [
    "torch.load", "file write", "output dir (++)", "output dir (+)", "os.system", "list value", "dict value",
    "quoted target", "double-quoted target", "whole override quoted", "partial", "recursive", "interpolation",
    "escaped interpolation", "search path", "deleted callback", "group outside conf", "group not ours", "package",
    "sweep", "unknown key", "not a string",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_planted_run_folder_is_refused_in_one_line_naming_the_override(tmp_path, victim, case):
    from kvcompress.eval import checkpoint_overrides
    from kvcompress.records import RefusedOverride

    marker = tmp_path / "marker"
    overrides, named = planted_cases(tmp_path, marker, victim)[case]
    folder = plant(tmp_path, overrides)
    before = (victim / "metrics.json").read_bytes()
    with pytest.raises(RefusedOverride) as refused:
        checkpoint_overrides(str(folder))
    message = one_line(refused.value)
    assert "\n" not in message and named in message and "is refused" in message
    assert not marker.exists() and (victim / "metrics.json").read_bytes() == before


def test_the_eval_cli_on_a_planted_folder_stops_in_one_line_and_runs_nothing(tmp_path, victim):
    """The audit's two worst cases end to end: a pickle through torch.load, and another run's output folder."""
    marker = tmp_path / "marker"
    cases = planted_cases(tmp_path, marker, victim)
    before = (victim / "metrics.json").read_bytes(), (victim / "metrics.json").stat().st_mtime_ns
    for i, case in enumerate(["torch.load", "output dir (++)"]):
        folder = plant(tmp_path, cases[case][0], name=f"planted{i}")
        out = tmp_path / f"eval{i}"
        done = run_cli("kvcompress.eval", [f"ckpt_path={folder}", f"hydra.run.dir={out}"], tmp_path)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert "is refused" in line and cases[case][1] in line
        assert not (out / "metrics.json").exists()
    assert not marker.exists()
    assert ((victim / "metrics.json").read_bytes(), (victim / "metrics.json").stat().st_mtime_ns) == before


def test_a_foreign_target_is_refused_before_anything_is_built(tmp_path, text_file):
    """Defence in depth: whatever composed the config, only the library's own targets are instantiated."""
    marker = tmp_path / "marker"
    for extra in (
        ["+callbacks.pwn._target_=os.system", f"+callbacks.pwn.command='touch {marker}'"],
        [f"+phase.stages.lm.after=[{{_target_: os.system, command: 'touch {marker}'}}]"],
        ["model._target_=builtins.exec", '+model.source=\'open("x", "w")\''],
    ):
        with pytest.raises(ValueError, match=r"_target_='(os\.system|builtins\.exec)' is not one of the library"):
            prepare(smoke(tmp_path, text_file, *extra))
    assert not marker.exists() and not (tmp_path / "cache").exists() and not (tmp_path / "stages").exists()


def test_report_and_reproduce_read_a_run_folder_as_json_data_only(tmp_path, victim):
    from kvcompress.evaluation import report
    from kvcompress.reproduce import RunSpec, runs, writer

    marker = tmp_path / "marker"
    overrides = [o for case in planted_cases(tmp_path, marker, victim).values() for o in case[0] if isinstance(o, str)]
    folder = plant(tmp_path, overrides)
    (folder / "best.ckpt").write_bytes((tmp_path / "evil.pt").read_bytes())  # a pickle beside it, never loaded
    with open(folder / "metrics.json") as f:
        record = json.load(f)
    record.update(val_ppl=10.0, val_loss=2.3, val_pos_ppl={"0-16": 11.0}, config={"seed": 0})
    (folder / "metrics.json").write_text(json.dumps(record))
    assert report.main([str(folder), "--out", str(tmp_path / "report")]) == 0
    spec = RunSpec("003", "baseline", 0, tuple(overrides), folder)
    (folder / runs.RUN_FILE).write_text(json.dumps({"overrides": overrides, "seconds": 1.0}))
    assert runs.finished(spec) and writer.load_table_runs([spec])["baseline"][0]["val_ppl"] == 10.0
    assert not marker.exists() and json.loads((victim / "metrics.json").read_text())["val_ppl"] == 12.5
    # They never build or load anything from a run folder: no instantiate, compose, pickle or torch.load.
    for path in ("evaluation/report.py", "reproduce/runs.py", "reproduce/writer.py"):
        source = (REPO / "kvcompress" / path).read_text()
        assert not re.search(r"instantiate|compose\(|pickle|torch\.load|\beval\(|\bexec\(", source), path


# --- 2. a failed retrain never destroys a finished stage -------------------------------------------------------------


class FailAt:
    """A callback that raises at a training step (a retrain that fails mid-fit)."""

    def __init__(self, step: int) -> None:
        import lightning as L

        class _Fail(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
                if trainer.global_step >= step:
                    raise RuntimeError("the retrain failed")

        self.callback = _Fail()


ONE_STAGE = [Stage(name="lm", lr=1e-3, max_epochs=1, patience=None)]


def stage_folder(tmp_path: Path) -> Path:
    (folder,) = [p for p in (tmp_path / "stages").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def test_a_failed_retrain_leaves_the_finished_stage_reusable(tmp_path):
    (first,) = make_runner(tmp_path, ONE_STAGE).run()
    folder = stage_folder(tmp_path)
    sha = file_sha256(folder / "weights.safetensors")
    done = (folder / DONE).read_bytes()
    with pytest.raises(RuntimeError, match="the retrain failed"):  # phase.reuse=false, failing mid-fit
        make_runner(tmp_path, ONE_STAGE, reuse=False, extra_callbacks=lambda: [FailAt(2).callback]).run()
    assert file_sha256(folder / "weights.safetensors") == sha and (folder / DONE).read_bytes() == done
    (again,) = make_runner(tmp_path, ONE_STAGE).run()
    assert again.reused and again.weights == first.weights and file_sha256(again.weights) == sha
    assert not sibling(folder, FRESH).exists()


def test_self_repair_retrains_beside_the_damaged_stage_and_replaces_it_when_done(tmp_path, caplog):
    make_runner(tmp_path, ONE_STAGE).run()
    folder = stage_folder(tmp_path)
    (folder / DONE).write_text("{not json")
    with pytest.raises(RuntimeError, match="the retrain failed"):
        make_runner(tmp_path, ONE_STAGE, extra_callbacks=lambda: [FailAt(2).callback]).run()
    assert (folder / "weights.safetensors").is_file() and (folder / DONE).read_text() == "{not json"  # not cleared
    assert "cannot be trusted" in caplog.text
    (repaired,) = make_runner(tmp_path, ONE_STAGE).run()
    assert not repaired.reused and json.loads((folder / DONE).read_text())["weights_sha256"]
    assert repaired.weights == str(folder / "weights.safetensors") and not sibling(folder, FRESH).exists()
    (reused,) = make_runner(tmp_path, ONE_STAGE).run()
    assert reused.reused


def test_a_kill_between_the_two_renames_is_completed_on_the_next_start(tmp_path):
    folder = tmp_path / "lm-abc"
    for tag, content in ((REPLACED, "old"), (FRESH, "new")):  # the old folder moved aside, the new one not yet in
        sibling(folder, tag).mkdir()
        (sibling(folder, tag) / DONE).write_text(content)
    finish_interrupted_swap(folder)
    assert (folder / DONE).read_text() == "new" and not sibling(folder, FRESH).exists()
    assert not sibling(folder, REPLACED).exists()


# --- 3. reuse keyed by contents --------------------------------------------------------------------------------------


def test_changed_data_or_tokenizer_at_the_same_path_trains_a_new_stage(tmp_path, text_file, caplog):
    caplog.set_level(logging.INFO)

    def run() -> dict:
        return run_guarded_metrics(smoke(tmp_path, text_file))

    first = run()
    inputs = first["inputs"]
    assert inputs["data"]["all"]["file_sha256"] == file_sha256(text_file)
    assert inputs["tokenizer"]["serialization_sha256"] and inputs["init_from"] is None
    # (same contents: reused, tests/test_train.py::test_second_run_reuses_the_stage)

    text_file.write_text(corpus_text(WORDS, seed=1))  # other text at the same path
    caplog.clear()
    second = run()
    assert not second["stages"][0]["reused"] and second["stages"][0]["key"] != first["stages"][0]["key"]
    assert re.search(
        rf"data\.all \({re.escape(str(text_file))}\): sha256 \w+ -> \w+.*training a new stage", caplog.text
    )

    tokenizer = text_file.with_name("tokenizer.json")  # another tokenizer at the same path
    train_tokenizer(corpus_text(OTHER_WORDS).splitlines()[:50], tokenizer, vocab_size=320)
    caplog.clear()
    third = run()
    assert not third["stages"][0]["reused"] and third["stages"][0]["key"] != second["stages"][0]["key"]
    assert re.search(rf"tokenizer \({re.escape(str(tokenizer))}\): sha256 .*training a new stage", caplog.text)


def run_guarded_metrics(cfg) -> dict:
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)  # (Hydra makes it)
    assert run_guarded(cfg, train_stages) is not None
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_init_from_is_hashed_into_the_inputs(tmp_path):
    from kvcompress.run import init_from_hash

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"b")
    (hf / "README.md").write_text("not read by the loader")
    before = init_from_hash(str(hf))
    assert init_from_hash(str(weights))["sha256"] == hashlib.sha256(b"a").hexdigest()
    (hf / "README.md").write_text("changed")
    assert init_from_hash(str(hf)) == before
    (hf / "model.safetensors").write_bytes(b"c")
    assert init_from_hash(str(hf))["sha256"] != before["sha256"]


# --- 4. every bad input fails before work, in one line ----------------------------------------------------------------

BAD_INPUTS = [
    (["model=vdproj", "model.attention_kwargs.rank=2.0"], "model.attention_kwargs.rank=2.0: a float is a share"),
    (["model=vdproj", "model.attention_kwargs.rank=0.0"], "model.attention_kwargs.rank=0.0: a float is a share"),
    (["model=vdproj", "model.attention_kwargs.rank=true"], "model.attention_kwargs.rank=True: give an int width"),
    (
        ["eval.autoregressive.enabled=true", "eval.autoregressive.max_batches=0"],
        "eval.autoregressive.max_batches (with eval.autoregressive.enabled) must be an integer >= 1, got 0",
    ),
    (["+data.eval_batch_size=0"], "data.eval_batch_size must be an integer >= 1 (or null: data.batch_size), got 0"),
    (["+data.eval_batch_size=-1"], "data.eval_batch_size must be an integer >= 1"),
    (["callbacks.position_ppl.buckets=[[0,100]]"], "[0, 100] reaches past data.seq_len=32"),
    (["eval.decode.prompt_len=5000"], "eval.decode.prompt_len=5000 + eval.decode.new_tokens=8 reach past"),
    (["eval.reversal.n_facts=0"], "eval.reversal.n_facts must be an integer >= 1, got 0"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0: give an integer >= 1 (batches) or a float"),
    (["phase.stages.lm.monitor=val_foo"], "phase.stages.lm.monitor='val_foo' is never logged by this stage; it can"),
    (["+trainer.max_steps=-5"], "trainer.max_steps must be an integer >= -1, got -5"),
    (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    (["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps must be an integer >= 1, got 0"),
    (["checkpoint.every_minutes=0"], "checkpoint.every_minutes must be null or a number > 0, got 0"),
    (["phase=two_stage"], "stage 'recon': pattern '*.[vk]_compress.*' matches no parameter"),
    (["eval.decode.repeats=0"], "eval.decode.repeats must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_a_bad_input_fails_before_work_in_one_line_naming_the_setting(tmp_path, text_file, overrides, message):
    with pytest.raises(INPUT_ERRORS) as err:
        prepare(smoke(tmp_path, text_file, *overrides))
    line = one_line(err.value)
    assert message in line and "\n" not in line
    assert not (tmp_path / "stages").exists() and not (tmp_path / "run").exists()  # nothing trained or written


def test_a_stage_may_monitor_what_it_logs(tmp_path, text_file):
    prepare(smoke(tmp_path, text_file, "phase.stages.lm.monitor=val_pos_ppl/0-16"))
    with pytest.raises(ValueError, match=r"it can monitor: .*val_recon"):
        prepare(smoke(tmp_path, text_file, "model=vdproj", "phase=two_stage", "phase.stages.recon.monitor=val_re"))


def test_a_malformed_tokenizer_file_is_one_line_naming_it(tmp_path, text_file):
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError) as err:
        prepare(smoke(tmp_path, text_file, f"data.tokenizer={bad}"))
    line = one_line(err.value)
    assert f"tokenizer file {bad} is not a valid tokenizer.json" in line and "\n" not in line


def test_eval_without_ckpt_path_is_one_line(tmp_path):
    done = run_cli("kvcompress.eval", [f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "MissingMandatoryValue" not in done.stderr
    assert "error: ValueError: ckpt_path is required: python -m kvcompress.eval ckpt_path=" in done.stderr


def test_reproduce_seeds_must_be_integers(capsys):
    from kvcompress.reproduce import main

    with pytest.raises(SystemExit) as exit_:
        main(["--seeds", "x", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds: 'x' is not a comma-separated list of integers" in err and "Traceback" not in err


FULL_DISK = """
import resource, signal, sys, numpy as np, torch
from kvcompress.utils import DiskFullError, atomic_write, atomic_write_json
from kvcompress.models.weights import save_weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
path = sys.argv[1]
writes = {
    "metrics": lambda: atomic_write_json(path, {"x": "y" * 100_000}),
    "weights": lambda: save_weights({"w": torch.zeros(50_000)}, path),
    "checkpoint": lambda: atomic_write(path, lambda f: torch.save({"w": torch.zeros(50_000)}, f), mode="wb"),
    "token cache": lambda: atomic_write(path, lambda f: np.save(f, np.zeros(50_000), allow_pickle=False), mode="wb"),
}
for name, write in writes.items():
    try:
        write()
    except DiskFullError as err:
        print(f"{name}|{err}")
"""


def test_a_full_disk_is_one_line_naming_the_file_and_the_bytes_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"earlier": "result"}')
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split("|", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"metrics", "weights", "checkpoint", "token cache"}
    for message in lines.values():
        assert re.fullmatch(
            rf"cannot write {re.escape(str(target))}: File too large \(it needed [\d,]+ bytes; .*\)", message
        )
    assert lines["weights"].count("200,") == 1  # 50,000 float32 = 200,000 bytes and a small header
    assert target.read_text() == '{"earlier": "result"}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json"
    ]  # the earlier result intact, no temp file left


def test_the_bytes_counted_are_the_bytes_a_write_needs(tmp_path):
    from kvcompress.utils import atomic_write

    for name, write in {
        "torch": lambda f: torch.save({"w": torch.arange(1000.0)}, f),
        "text": lambda f: f.write("é" * 1000),
    }.items():
        path = tmp_path / name
        counted: dict[str, int] = {}

        def spy(f, write=write, counted=counted):
            write(f)
            counted["n"] = f.requested

        atomic_write(path, spy, mode="w" if name == "text" else "wb")
        assert counted["n"] == path.stat().st_size


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_keeps_earlier_results(tmp_path, text_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"earlier": "result"}')
    tokenizer = text_file.with_name("tokenizer.json")
    args = [
        "debug=smoke", "data=local", f"data.path={text_file}", f"data.tokenizer={tokenizer}", f"hydra.run.dir={run}",
        f"paths.stage_dir={tmp_path / 'stages'}", "logger=none", "print_config=false",
    ]  # fmt: skip

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # the token cache fits, a checkpoint not

    done = run_cli("kvcompress.train", args, tmp_path, preexec_fn=limit)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    (line,) = [line for line in done.stdout.splitlines() if "DiskFullError" in line]
    assert re.search(r"cannot write \S+\.ckpt: File too large \(it needed [\d,]+ bytes", line)
    assert (run / "metrics.json").read_text() == '{"earlier": "result"}'
    assert not list((tmp_path / "stages").rglob("*.tmp"))


# --- two reproduce processes, stale failure.txt, warnings -------------------------------------------------------------


def test_a_second_reproduce_on_one_folder_waits_for_the_first(tmp_path):
    from kvcompress.reproduce.runs import output_lock

    out = tmp_path / "out"
    args = ["-m", "kvcompress.reproduce", "--scale", "paper", "--tables", "003", "--seeds", "0", "--report-only"]
    with output_lock(out):
        second = subprocess.Popen(
            [sys.executable, *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not (out / "REPRODUCTION.md").exists() and time.monotonic() < deadline and second.poll() is None:
            time.sleep(0.5)
            if time.monotonic() > deadline - 50:  # given ten seconds, it has not gone past the lock
                break
        assert second.poll() is None and not (out / "REPRODUCTION.md").exists()
    _, err = second.communicate(timeout=120)
    assert f"in use by another reproduce (pid {os.getpid()}): waiting" in err and "StageLockedError" not in err
    assert (out / "REPRODUCTION.md").is_file()


def test_a_run_that_succeeds_removes_an_older_failure_file(tmp_path, text_file):
    cfg = smoke(tmp_path, text_file)
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "failure.txt").write_text("ValueError: an earlier attempt\n")
    run_guarded_metrics(cfg)
    assert (run / "metrics.json").is_file() and not (run / "failure.txt").exists()


def test_checkpoint_files_are_never_unpickled_by_eval(tmp_path):
    """A `.ckpt` holding a pickle payload is refused by the safe loader (weights_only), the payload never runs."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"net.w": Payload(marker)}}, evil)
    from kvcompress.models.weights import BadWeightsError, load_weights

    with pytest.raises(BadWeightsError):
        load_weights(evil)
    assert not marker.exists()
