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


@pytest.fixture(scope="module")
def alone_engines(checkpoints):
    """(llama checkpoint folder, get): ``get(jump_forward)`` is an engine with a large pool and no
    speculation or run-ahead, made once per module, on which the stress tests run each request
    alone as their oracle."""
    from llmir_lang.executor.engine import Engine

    folder, _ = checkpoints("llama")
    made: dict[bool, Engine] = {}

    def get(jump_forward: bool) -> Engine:
        if jump_forward not in made:
            made[jump_forward] = Engine(
                str(folder),
                device="cpu",
                kv_memory=4096 * 512,
                jump_forward=jump_forward,
                speculative_draft_tokens=0,
                run_ahead=False,
            )
        return made[jump_forward]

    yield str(folder), get
    for eng in made.values():
        eng.shutdown()
