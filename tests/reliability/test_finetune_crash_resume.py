"""Fine-tuning (bundles/tumor_segmentation) killed with SIGKILL mid-epoch resumes exactly.

Mirrors tests/bundles/test_crash_resume.py for the segmentation bundle, whose train.json
resumes through ``SafeCheckpointLoader`` (``resume_from``, set by ``--resume auto``) from the
``TrainingCheckpointSaver`` checkpoints (network, optimizer, lr scheduler, trainer state).
An uninterrupted run with the same seed is the reference, so the test also proves
determinism: two seeded fine-tuning runs write the same loss curve.

Set-up: sample CT phantoms, 4 training cases, batch 2 -> 2 iterations per epoch, 4 epochs
(8 iterations), a checkpoint every 2 iterations, no validation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.bundles.helpers import REPO, read_loss_csv

pytestmark = [pytest.mark.bundle, pytest.mark.slow]
EPOCHS, ITERS_PER_EPOCH, CKPT_INTERVAL = 4, 2, 2


def _finetune(out, *extra) -> list[str]:
    return [sys.executable, "-m", "monai_mask", "finetune", "--prepared",
            str(REPO / "sample_data" / "ct" / "prepared"), "--out", str(out),
            "--epochs", str(EPOCHS), "--seed", "3", "--set", f"ckpt_interval={CKPT_INTERVAL}",
            "--set", "val_interval=100", *extra]


def _run(cmd) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _kill_mid_epoch(out, after_rows: int) -> int:
    """Start a run, SIGKILL it once ``after_rows`` iterations are logged; the last iteration."""
    proc = subprocess.Popen(_finetune(out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    loss_csv = out / "loss.csv"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if loss_csv.exists() and len(read_loss_csv(loss_csv)) >= after_rows:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return read_loss_csv(loss_csv)[-1][1]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run(_finetune(reference))
    expected = read_loss_csv(reference / "loss.csv")
    total = EPOCHS * ITERS_PER_EPOCH
    assert [r[:2] for r in expected] == [((i - 1) // ITERS_PER_EPOCH + 1, i)
                                         for i in range(1, total + 1)]

    killed_at = _kill_mid_epoch(crashed, after_rows=5)  # after the first iteration of epoch 3
    assert 5 <= killed_at < total
    models = crashed / "models"
    checkpoints = sorted(models.glob("checkpoint_checkpoint_iteration=*.pt"))
    assert checkpoints and not (models / "checkpoint_final.pt").exists()
    assert not (models / "model.pt").exists()
    last_saved = max(int(p.stem.split("=")[-1]) for p in checkpoints)
    assert 0 <= killed_at - last_saved <= CKPT_INTERVAL  # nothing lost beyond the interval

    _run(_finetune(crashed, "--resume", "auto"))
    rows = read_loss_csv(crashed / "loss.csv")
    assert rows[-1][:2] == (EPOCHS, total)  # the planned iteration count
    first, last = {}, {}
    for _, iteration, loss in rows:
        if iteration in first:  # a replayed iteration repeats its loss exactly
            assert loss == first[iteration], iteration
        first.setdefault(iteration, loss)
        last[iteration] = loss
    assert sorted(last) == [r[1] for r in expected]
    assert [last[r[1]] for r in expected] == [r[2] for r in expected]  # same seed, same curve
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
    assert not list(models.glob("*.tmp")) and not list(models.glob(".*"))
