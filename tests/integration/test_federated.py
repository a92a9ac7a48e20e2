"""MONAI FL: ``MonaiAlgo`` drives bundles/tumor_segmentation through one local round on CPU.

What an NVIDIA FLARE client does with the bundle (docs/federated.md), without FLARE: initialise
from the bundle root and its train/evaluate configs, train one local epoch starting from the
incoming global weights, send back the updated weights, evaluate global weights locally.
The hospital's data is prepared with ``monai-mask prepare`` into a temporary folder, as a site
would. Cost: about 30 s on 2 CPU cores (prepare, 1 epoch of 3 iterations, 2 validations).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from tests.bundles.helpers import BUNDLES, REPO

SAMPLE = REPO / "sample_data" / "ct"
pytestmark = [pytest.mark.slow, pytest.mark.bundle]


def _server_weights() -> dict[str, torch.Tensor]:
    """Global weights a server sends: the bundle's network, its own seeded initialisation."""
    from monai_mask.engines.finetune import segmentation_network_from_mae

    torch.manual_seed(1234)
    model = segmentation_network_from_mae("vit_mae_tiny_p8_i32", (32, 32, 32), out_channels=2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def test_monai_algo_runs_one_local_round(tmp_path):
    from ignite.engine import Events
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject
    from monai.utils.enums import EngineStatsKeys

    prep = subprocess.run(
        [sys.executable, "-m", "monai_mask", "prepare", "--images", str(SAMPLE / "imagesTr"),
         "--labels", str(SAMPLE / "labelsTr"), "--out", str(tmp_path / "prepared")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert prep.returncode == 0, prep.stderr[-3000:]
    overrides = {"dataset_dir": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "run"),
                 "ckpt_dir": str(tmp_path / "run" / "models"), "sw_overlap": 0.25}
    algo = MonaiAlgo(bundle_root=str(BUNDLES / "tumor_segmentation"), local_epochs=1,
                     send_weight_diff=False, train_kwargs=dict(overrides),
                     eval_kwargs=dict(overrides))
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site_a"})
    try:
        incoming = _server_weights()
        at_start = {}
        algo.trainer.add_event_handler(
            Events.STARTED, lambda _: at_start.update(_state(algo.trainer.network)))
        algo.train(ExchangeObject(weights=incoming, weight_type=WeightType.WEIGHTS))

        # local training started from exactly the global weights
        assert at_start.keys() == incoming.keys()
        assert all(torch.equal(at_start[k], incoming[k]) for k in incoming)
        out = algo.get_weights()
        assert out.weight_type == WeightType.WEIGHTS and out.optim is None  # weights only
        assert out.weights.keys() == incoming.keys()
        assert all(out.weights[k].shape == v.shape for k, v in incoming.items())
        changed = [k for k, v in incoming.items() if not torch.equal(out.weights[k], v)]
        assert len(changed) > len(incoming) // 2, changed
        assert all(torch.isfinite(v).all() for v in out.weights.values())
        # one local epoch: every batch of the site's training fold, once
        epoch_length = algo.trainer.state.epoch_length
        assert epoch_length > 0 and algo.trainer.state.epoch == 1
        assert out.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] == epoch_length
        # beyond weights, only counts and the local validation metric leave the site
        allowed = {k.value for k in EngineStatsKeys} | {FlStatistics.NUM_EXECUTED_ITERATIONS}
        assert set(out.statistics) <= allowed, set(out.statistics) - allowed

        metrics = algo.evaluate(ExchangeObject(weights=out.weights))
        dice = metrics.metrics["val_mean_dice"]
        assert math.isfinite(dice) and 0.0 <= dice <= 1.0
        evaluated = _state(algo.evaluator.network)  # the evaluator ran on the sent weights
        assert all(torch.equal(evaluated[k], out.weights[k]) for k in incoming)
    finally:
        algo.finalize()
