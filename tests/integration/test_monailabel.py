"""MONAI Label 0.8.5 serves both bundles the way 3D Slicer calls them.

A real ``monailabel start_server`` (its own virtual environment, built or reused by
``scripts/monailabel_env.sh``) runs the unmodified ``monaibundle`` sample app on loopback, with
``tumor_segmentation`` and ``tumor_detection`` copied into its ``model/`` folder (weights from a
short training run here, so nothing is downloaded) and three sample CT volumes as studies.

Costs on 2 CPU cores (measured): the venv build 274 s on a fresh machine (reused afterwards,
<1 s); training both bundles and starting the server (ready in ~10 s) 39 s; the calls and the
reference bundle runs ~25 s; the whole module ~65 s once the venv exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from monai_mask.data.boxes import boxes_from_label
from monai_mask.io.readers import read_image
from monai_mask.io.writers import read_boxes_json
from tests.bundles.helpers import BUNDLES, REPO, run_bundle

pytestmark = pytest.mark.integration

SAMPLE = REPO / "sample_data" / "ct"
PREPARED = SAMPLE / "prepared"
STUDIES = ("case_001", "case_002", "case_004")
SEG_CASE, DET_CASE = "case_002", "case_004"  # 2 and 3 tumours
SEG, DET = "tumor_segmentation", "tumor_detection"
# what the bundle tests use for a short run (tests/bundles/test_tumor_*.py)
SEG_TRAIN = {"max_epochs": 2, "sw_overlap": 0.25}
# the detector learns the lesions of the case it is asked about (one case, 120 iterations, no
# flips: as tests/bundles/test_tumor_detection.py); generalisation is the detection study's job
DET_TRAIN = {"max_epochs": 120, "val_interval": 120, "flip_prob": 0.0,
             "train#data": f"$[d for d in @all_data if d['case_id'] == '{DET_CASE}']",
             "validate#data": f"$[d for d in @all_data if d['case_id'] == '{DET_CASE}']"}
# MONAI Label must never reach the network: any HTTP(S) attempt goes to a closed local port.
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    """A running MONAI Label server: base URL, process and log file."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, venv: Path) -> None:
        self.url, self.proc, self.log, self.venv = url, proc, log, venv

    def log_tail(self, n: int = 80) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n--- MONAI Label server log (tail) ---\n" + "\n".join(lines[-n:])

    def request(self, path: str, method: str = "GET", timeout: float = 300) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with _LOCAL.open(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def ok(self, path: str, method: str = "GET") -> bytes:
        status, body = self.request(path, method)
        assert status == 200, f"{method} {path}: {status} {body[:500]!r}" + self.log_tail()
        return body


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def venv() -> Path:
    """MONAI Label 0.8.5's own virtual environment (built once, then reused)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "monailabel_env.sh")],
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(proc.stderr.strip().splitlines()[-1:], path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """model.pt of each bundle after a short training run on the sample CT phantoms."""
    tmp = tmp_path_factory.mktemp("weights")
    out = {}
    for name, overrides in ((SEG, SEG_TRAIN), (DET, DET_TRAIN)):
        run_bundle(name, ["train.json"], {"output_dir": str(tmp / name),
                                          "ckpt_dir": str(tmp / name / "models"), **overrides},
                   timeout=1200)
        out[name] = tmp / name / "models" / "model.pt"
        assert out[name].is_file()
    return out


def _install_bundle(name: str, model: Path, app: Path) -> None:
    """Copy a bundle into the app's ``model/`` with its weights and the plan it was trained on."""
    dest = app / "model" / name
    shutil.copytree(BUNDLES / name, dest, ignore=shutil.ignore_patterns("models", "eval"))
    (dest / "models").mkdir()
    shutil.copy(model, dest / "models" / "model.pt")
    config = dest / "configs" / "inference.json"
    doc = json.loads(config.read_text())
    doc["dataset_dir"] = str(PREPARED)  # the folder whose plan.json the model was trained with
    doc["sw_overlap"] = 0.25
    config.write_text(json.dumps(doc, indent=4))


@pytest.fixture(scope="module")
def server(venv, weights, tmp_path_factory):
    """``monailabel start_server`` on a free loopback port; always stopped afterwards."""
    tmp = tmp_path_factory.mktemp("monailabel")
    app, studies = tmp / "app", tmp / "studies"
    shutil.copytree(venv / "monailabel" / "sample-apps" / "monaibundle", app,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name, model in weights.items():
        _install_bundle(name, model, app)
    studies.mkdir()
    for case in STUDIES:
        shutil.copy(SAMPLE / "imagesTr" / f"{case}.nii.gz", studies)
    port, log = _free_port(), tmp / "server.log"
    env = {**os.environ, **NO_NETWORK, "PYTHONPATH": str(REPO),
           "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions")}
    cmd = [str(venv / "bin" / "python"), "-m", "monailabel.main", "start_server",
           "--app", str(app), "--studies", str(studies), "--conf", "models", f"{SEG},{DET}",
           "--conf", "zoo_source", "github", "--conf", "sam2", "false",
           "--conf", "skip_trainers", "true", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, venv)
    try:
        _wait_ready(srv, timeout=300)
        yield srv
    finally:
        _stop(proc)


def _wait_ready(srv: Server, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if srv.proc.poll() is not None:
            pytest.fail(f"MONAI Label exited with {srv.proc.returncode}" + srv.log_tail())
        try:
            if srv.request("/info/", timeout=5)[0] == 200:
                print(f"MONAI Label ready after {time.monotonic() - start:.1f} s")
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"MONAI Label not ready after {timeout} s" + srv.log_tail())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _lesions(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (cccwhd, LPS mm) and centroids (LPS mm) of the case's tumours, from its label."""
    label = read_image(SAMPLE / "labelsTr" / f"{case}.nii.gz")
    boxes, _, centroids = boxes_from_label(np.rint(label.array).astype(np.int64), label.affine)
    entry = next(e for e in json.loads((SAMPLE / "dataset.json").read_text())["training"]
                 if e["patient_id"] == case)
    np.testing.assert_allclose(np.sort(boxes, axis=0), np.sort(np.array(entry["box"]), axis=0),
                               atol=1e-4)  # the convention the sample data documents
    return boxes, centroids


def _inside(box: np.ndarray, point: np.ndarray) -> bool:
    return bool(np.all(np.abs(point - box[:3]) <= box[3:] / 2))


# ----------------------------------------------------------------------------- tests


def test_server_uses_local_bundles_only(server):
    log = server.log.read_text(errors="replace")
    for name in (SEG, DET):
        assert f"Adding Bundle from Local: {name}" in log, server.log_tail()
    assert "from NGC" not in log and "Downloading" not in log, server.log_tail()
    assert "Checkpoint keys don't match" not in log, server.log_tail()  # strict-equivalent load


def test_info_lists_both_models_with_types_and_labels(server):
    info = json.loads(server.ok("/info/"))
    models = info["models"]
    assert models[SEG]["type"] == "segmentation" and models[SEG]["labels"] == {"tumour": 1}
    assert models[DET]["type"] == "detection" and models[DET]["labels"] == {"tumour": 0}
    assert all(models[m]["dimension"] == 3 for m in (SEG, DET))
    assert info["datastore"]["total"] == len(STUDIES)


def test_segmentation_returns_a_label_image_on_the_input_grid(server, weights, tmp_path):
    body = server.ok(f"/infer/{SEG}?image={SEG_CASE}&output=image", method="POST")
    (tmp_path / "ml.nii.gz").write_bytes(body)
    label, image = read_image(tmp_path / "ml.nii.gz"), read_image(SAMPLE / "imagesTr"
                                                                   / f"{SEG_CASE}.nii.gz")
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    values = set(np.unique(label.array).tolist())
    assert values <= {0, 1}, values  # background + the declared "tumour": 1
    # same prediction as `python -m monai.bundle run` inference with the same weights
    run_bundle(SEG, ["inference.json"], {
        "input_path": str(SAMPLE / "imagesTr" / f"{SEG_CASE}.nii.gz"),
        "output_dir": str(tmp_path / "run"), "ckpt_path": str(weights[SEG]),
        "formats": ["nifti"], "sw_overlap": 0.25})
    reference = read_image(tmp_path / "run" / f"{SEG_CASE}_seg.nii.gz").array
    np.testing.assert_array_equal(label.array, reference)
    print(f"segmentation {label.shape}: values {sorted(values)}, "
          f"{int((label.array == 1).sum())} tumour voxels")


def test_detection_returns_lps_boxes_around_the_lesions(server, weights, tmp_path):
    result = json.loads(server.ok(f"/infer/{DET}?image={DET_CASE}&output=json", method="POST"))
    boxes = np.asarray(result["box"], dtype=np.float64).reshape(-1, 6)
    assert set(result["label"]) <= {0} and len(result["label"]) == len(boxes)
    # the same world boxes as `python -m monai.bundle run` inference (its JSON says LPS, cccwhd)
    run_bundle(DET, ["inference.json"], {
        "input_path": str(SAMPLE / "imagesTr" / f"{DET_CASE}.nii.gz"),
        "output_dir": str(tmp_path / "run"), "ckpt_path": str(weights[DET]),
        "sw_overlap": 0.25})
    written = json.loads((tmp_path / "run" / f"{DET_CASE}_boxes.json").read_text())
    assert (written["box_mode"], written["box_space"]) == ("cccwhd", "LPS")
    reference, _, _ = read_boxes_json(tmp_path / "run" / f"{DET_CASE}_boxes.json")
    assert len(reference) == len(boxes)
    if len(boxes):
        gap = np.abs(boxes[:, None, :] - reference[None, :, :]).max(axis=-1)
        assert gap.min(axis=1).max() < 1e-4 and gap.min(axis=0).max() < 1e-4
    _, centroids = _lesions(DET_CASE)
    hits = [[i for i, box in enumerate(boxes) if _inside(box, c)] for c in centroids]
    print(f"detection: {len(boxes)} boxes; boxes containing each of the {len(centroids)} "
          f"lesion centroids {np.round(centroids, 1).tolist()}: {hits}")
    assert all(hits), f"lesion centroids not inside any returned box: {hits}"


def test_slicer_client_gets_the_label_file_and_the_markups(server, tmp_path):
    """MONAI Label's own client (the code Slicer's extension runs): multipart, no ``output``."""
    script = (
        "import json, sys\n"
        "from monailabel.client import MONAILabelClient\n"
        "c = MONAILabelClient(sys.argv[1], tmpdir=sys.argv[2])\n"
        "out = {m: c.infer(m, i, {}) for m, i in ((sys.argv[3], sys.argv[4]),"
        " (sys.argv[5], sys.argv[6]))}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [str(server.venv / "bin" / "python"), "-c", script, server.url, str(tmp_path),
         SEG, SEG_CASE, DET, DET_CASE],
        capture_output=True, text=True, timeout=600, env={**os.environ, **NO_NETWORK})
    assert proc.returncode == 0, proc.stderr[-3000:] + server.log_tail()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    seg_file, seg_params = out[SEG]
    label = read_image(seg_file)
    assert label.shape == read_image(SAMPLE / "imagesTr" / f"{SEG_CASE}.nii.gz").shape
    assert seg_params["label_names"] == {"tumour": 1}
    det_file, det_params = out[DET]
    markups = json.loads(Path(det_file).read_text())
    rois = markups["markups"]
    assert len(rois) == len(det_params["box"])
    for roi, box in zip(rois, det_params["box"], strict=True):
        assert roi["type"] == "ROI" and roi["coordinateSystem"] == "LPS"
        np.testing.assert_allclose(roi["center"] + roi["size"], box)
