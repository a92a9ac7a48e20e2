"""A pretraining run killed with SIGKILL mid-epoch resumes from its latest checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.bundles.helpers import REPO, read_loss_csv

pytestmark = [pytest.mark.bundle, pytest.mark.slow]


def _pretrain(out, *extra):
    return [sys.executable, "-m", "monai_mask", "pretrain", "--prepared",
            str(REPO / "sample_data" / "ct" / "prepared"), "--out", str(out), "--epochs", "8",
            "--set", "ckpt_interval=2", "--set", "val_interval=100",
            "--set", "preview_interval=1000", *extra]


def test_sigkill_mid_epoch_then_resume_auto(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_pretrain(out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    loss_csv = out / "loss.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if loss_csv.exists() and len(read_loss_csv(loss_csv)) >= 7:  # inside epoch 4
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = read_loss_csv(loss_csv)[-1][1]
    checkpoints = sorted((out / "models").glob("checkpoint_checkpoint_iteration=*.pt"))
    assert checkpoints and not (out / "models" / "checkpoint_final.pt").exists()

    done = subprocess.run(_pretrain(out, "--resume", "auto"), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_loss_csv(loss_csv)
    assert rows[-1][:2] == (8, 16)  # the planned iteration count is reached
    first = {}
    for _, iteration, loss in rows:  # replayed iterations repeat the same loss
        if iteration in first:
            assert loss == pytest.approx(first[iteration], rel=1e-5)
        first.setdefault(iteration, loss)
    lost = killed_at - max(int(p.stem.split("=")[-1]) for p in checkpoints)
    assert 0 <= lost <= 2  # nothing lost beyond the checkpoint interval (2 iterations)
    assert (out / "models" / "model.pt").is_file()
