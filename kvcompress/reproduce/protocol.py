"""The protocols (`conf/reproduce/<scale>.yaml`) and the plan: one `RunSpec` per (table, run, seed), composed as
the train CLI would compose it; the mini scale's BPE tokenizer."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

log = logging.getLogger("kvcompress.reproduce")
CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
PROTOCOL_DIR = CONF_DIR / "reproduce"


@dataclass(frozen=True)
class RunSpec:
    table: str
    name: str
    seed: int
    overrides: tuple[str, ...]  # without seed / folders
    folder: Path
    note: str = ""  # e.g. the offline substitution

    def command(self, stage_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kvcompress.train",
            *self.overrides,
            f"seed={self.seed}",
            f"task_name=reproduce_{self.table}_{self.name}",
            f"hydra.run.dir={self.folder}",
            f"paths.stage_dir={stage_dir}",
            "print_config=false",
        ]


def load_protocol(scale: str) -> dict[str, Any]:
    path = PROTOCOL_DIR / f"{scale}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
        raise ValueError(f"--scale {scale!r}: no protocol {path} (known: {known})")
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # a mapping file


def released_weights_available(name: str = "EleutherAI/pythia-70m") -> bool:
    """Can report 001's pretrained base be loaded (a Hub download)? Offline it cannot."""
    from kvcompress.data.tokenizer import hub_offline

    return not hub_offline()


def plan(
    protocol: dict[str, Any], tables: Sequence[str], seeds: Sequence[int], out: Path, tokenizer: Path | None
) -> list[RunSpec]:
    def flat(overrides: list[Any]) -> tuple[str, ...]:  # a YAML alias (*small) nests a list: splice it
        items = [x for o in overrides for x in (o if isinstance(o, list) else [o])]
        return tuple(str(x).replace("{tokenizer}", str(tokenizer)) for x in items)

    specs = []
    check = protocol.get("context_check") or []
    check = [check] if isinstance(check, str) else list(check)
    extra = tuple(str(c) for c in check)  # every table's runs, unless the table says `context_check: false`
    for table in tables:
        if table not in protocol["tables"]:
            raise ValueError(f"--tables: no table {table!r} in the {protocol['scale']} protocol")
        entry = protocol["tables"][table]
        runs, notes = dict(entry["runs"]), {}
        substitute = entry.get("offline_substitute") or {}
        if substitute and not released_weights_available():
            for name, overrides in substitute.items():
                runs[name] = overrides
                notes[name] = "offline: the released weights cannot be loaded, so the base is trained first"
        for name, overrides in runs.items():
            for seed in seeds:
                folder = out / table / name / f"seed{seed}"
                checked = extra if entry.get("context_check", True) else ()
                specs.append(RunSpec(table, name, seed, (*flat(overrides), *checked), folder, notes.get(name, "")))
    return resolve_run_references(specs)


RUN_REFERENCE = re.compile(r"\{run:([A-Za-z0-9_]+)\}")


def resolve_run_references(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """Replace `{run:<name>}` in a run's overrides by the folder of run <name> of the same table and seed, which must
    come earlier in the plan (runs train in plan order): e.g. a GQA conversion starts from its table's baseline."""
    done: dict[tuple[str, str, int], Path] = {}
    out = []
    for spec in specs:

        def folder(match: re.Match[str], spec: RunSpec = spec) -> str:
            key = (spec.table, match.group(1), spec.seed)
            if key not in done:
                raise ValueError(
                    f"table {spec.table} run {spec.name}: {match.group(0)} names no earlier run of seed {spec.seed}"
                )
            return str(done[key])

        out.append(replace(spec, overrides=tuple(RUN_REFERENCE.sub(folder, o) for o in spec.overrides)))
        done[(spec.table, spec.name, spec.seed)] = spec.folder
    return out


def compose(spec: RunSpec, stage_dir: Path) -> Any:
    """Compose the run's config as the train CLI would (raises on an override that does not compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvcompress.run  # noqa: F401  (registers the structured configs and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(spec.command(stage_dir)[3:]), return_hydra_config=True)


def tokenizer_path(spec: dict[str, Any], out: Path) -> Path:
    return out / "tokenizer" / f"{spec['source']}-bpe{spec['vocab_size']}" / "tokenizer.json"


def ensure_tokenizer(spec: dict[str, Any] | None, out: Path) -> Path | None:
    """The mini scale's BPE tokenizer, trained on the training split's text (reused when present)."""
    if not spec:
        return None
    from kvcompress.data.sources import TRAIN, resolve_source
    from kvcompress.data.tokenizer import train_bpe_tokenizer

    path = tokenizer_path(spec, out)
    if not path.is_file():
        text = resolve_source(spec["source"])[TRAIN].read()
        texts = [text] if isinstance(text, str) else list(text)
        log.info("training a %d-token BPE tokenizer on %s's training split", spec["vocab_size"], spec["source"])
        train_bpe_tokenizer(texts, int(spec["vocab_size"]), path)
    return path.resolve()
