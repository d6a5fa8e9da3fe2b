"""A fleet of two tuning workers sharing one Optuna study in a real PostgreSQL server.

``.ci/services.sh`` starts the server and exports ``ATTNCC_TEST_POSTGRES_URL``. The two
workers are separate processes (as on separate machines); they wait for each other before
tuning so that both really contribute. Together they stop at the study's budget, and the
result lands in the ordinary tuning cache with the best time the study measured.

Run as a script (``python tests/test_tune_postgres.py worker ...``) it is one worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

URL = os.environ.get("ATTNCC_TEST_POSTGRES_URL")
SKIP_REASON = os.environ.get("ATTNCC_TEST_POSTGRES_SKIP_REASON") or (
    "ATTNCC_TEST_POSTGRES_URL is not set (run through .ci/run, or `source .ci/services.sh` first)")
BUDGET = 8
WORKERS = 2
REPO = Path(__file__).resolve().parents[1]


def _key(fingerprint: str):
    from attncc.autotune.keys import ShapeKey, TuningKey

    return TuningKey(fingerprint, "fake", "cpu-00000000000000aa", ShapeKey.of(1, 2, 64, 16))


def worker(url: str, fingerprint: str, rendezvous: str, index: int) -> None:
    """One fleet worker: wait for the others, then join the shared study."""
    import torch

    import attncc
    from attncc.autotune.fake import FakeBackend
    from attncc.autotune.study import make_operands, reference_checker, tune_key

    torch.set_num_threads(1)
    program = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, name="causal")
    operands = make_operands(program, (1, 2, 64, 16), torch.float32, "cpu")
    backend = FakeBackend(unit_ms=20.0)  # slow enough that the workers overlap

    def run(config):
        return backend.run(program.plan, operands, program.tensors, scale=None, q_offset=0, return_lse=False,
                           config=config)

    Path(rendezvous, f"ready-{index}").touch()
    deadline = time.time() + 60
    while len(list(Path(rendezvous).glob("ready-*"))) < WORKERS and time.time() < deadline:
        time.sleep(0.05)
    tune_key(_key(fingerprint), backend.search_space, run, BUDGET, checker=reference_checker(program, operands),
             storage=url, seed=index, warmup=1, repeats=2, progress=False)


@pytest.mark.skipif(URL is None, reason=SKIP_REASON)
def test_two_workers_share_one_study_through_postgresql(tmp_path):
    pytest.importorskip("psycopg2", reason="psycopg2-binary (in the test extras) is needed for PostgreSQL")
    import optuna

    from attncc.autotune.cache import TuningCache
    from attncc.autotune.study import open_storage

    fingerprint = f"fleet{uuid.uuid4().hex}"
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "worker", URL, fingerprint, str(tmp_path), str(i)],
                              env=env, cwd=REPO, stderr=subprocess.PIPE, text=True) for i in range(WORKERS)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORKERS, "\n".join(errors)

    study_name = f"attncc/{_key(fingerprint).text}"
    storage = open_storage(URL)
    study = optuna.load_study(study_name=study_name, storage=storage)
    try:
        measured = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("measured")]
        assert BUDGET <= len(measured) <= BUDGET + WORKERS - 1, "the workers stop together at the budget"
        assert len({t.user_attrs["worker"] for t in measured}) == WORKERS, "both workers measured trials"
        entry = TuningCache(tmp_path / "cache" / "tuning.v1.sqlite").get(_key(fingerprint))
        assert entry is not None, "the fleet's result lands in the ordinary tuning cache"
        assert entry.time_ms == min(t.value for t in measured)
        assert entry.config["wrong"] is False
    finally:
        optuna.delete_study(study_name=study_name, storage=storage)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
