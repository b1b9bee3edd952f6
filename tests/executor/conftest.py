from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (folder, HF model); built lazily, once per session."""
    from hf_fixtures import build_checkpoint

    made: dict[str, tuple[Path, object]] = {}

    def get(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"ckpt_{arch}")
            made[arch] = (folder, build_checkpoint(arch, folder))
        return made[arch]

    return get
