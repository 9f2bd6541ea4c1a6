import os
import random
from pathlib import Path

import pytest
import torch

# Tests never touch the network: the Hub retries for ~50 s when offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
if "KVCOMPRESS_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["KVCOMPRESS_DATA_DIR"] = str(SHARED_DATA)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def data_dir() -> Path:
    path = os.environ.get("KVCOMPRESS_DATA_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("KVCOMPRESS_DATA_DIR (the offline shared data) is not available")
    return Path(path)


CORPUS_WORDS = "the of a model cache key value attention token layer train data loss head rank".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus for whole-run subprocess tests (which still need the offline tokenizer)."""
    if not os.environ.get("KVCOMPRESS_DATA_DIR"):
        pytest.skip("KVCOMPRESS_DATA_DIR (the offline tokenizer) is not available")
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(CORPUS_WORDS) for _ in range(40)) + " ." for _ in range(200)))
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how many tests the missing offline data skipped, and how to run them."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "KVCOMPRESS_DATA_DIR" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests need the offline data (WikiText-2 and the Pythia tokenizer) and were skipped: "
            "run them with KVCOMPRESS_DATA_DIR=/path/to/shared/data make test",
            yellow=True,
        )
