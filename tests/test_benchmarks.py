"""The benchmarks' one-shot device script, run for real on the CPU in its shrunk form: every benchmark it
drives starts, takes `--device` and `--json`, and returns its figures (a GPU session runs the same
commands unshrunk, once, so a broken option must show here first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_figures_quick_runs_every_benchmark_to_a_result(tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_figures.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads((out / "figures.json").read_text())
    assert figures["device"] == "cpu" and figures["quick"] is True
    assert set(figures["benchmarks"]) == {"step_cost", "hessian", "landscape", "epoch"}
    for name, entry in figures["benchmarks"].items():
        assert entry["exit"] == 0, (name, (out / f"{name}.log").read_text())
        assert json.loads((out / f"{name}.json").read_text()) == entry["result"]
        assert entry["result"]["device"] == "cpu"
    results = {name: entry["result"] for name, entry in figures["benchmarks"].items()}
    step = results["step_cost"]
    assert set(step["models"]) == {"mlp-64", "diag-linear"}
    for model in step["models"].values():  # measured times, so every ratio is a positive finite number
        assert all(0 < value < float("inf") for value in model["ratios"].values())
    assert set(results["epoch"]["epoch_seconds"]) == {"sgd", "msam4"}
    assert all(seconds > 0 for seconds in results["epoch"]["epoch_seconds"].values())
    hessian = results["hessian"]["workloads"]
    assert list(hessian) == ["small"]
    top1 = hessian["small"]["rows"]["samlab top1 (default tol 1e-6)"]
    assert top1["max_rel_error"] <= 1e-4  # against ARPACK on the float64 model
    assert set(results["landscape"]["workloads"]) == {"digits-mlp", "diag-linear"}


def test_device_figures_rejects_an_unknown_benchmark():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_figures.py"), "--device", "cpu",
                           "--only", "step_cost,nope"], capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert "--only: unknown benchmark(s) nope" in proc.stderr


def test_lanczos_products_dense_spectrum_agrees_with_samlabs_lanczos():
    """The product-count bound runs on a small width, and its dense Hessian's top eigenvalue is the one
    samlab's Lanczos finds on the same trained model (two independent computations)."""
    from samlab.config import DataConfig
    from samlab.data import load_dataset
    from samlab.hessian import top_eigenvalues
    from samlab.losses import mean_loss

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lanczos_products.py"), "--width", "2",
                           "--starts", "10", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    data = load_dataset(DataConfig(name="digits"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from hessian_vs_pyhessian import SAMPLES, trained_model
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = trained_model(2, data, 0)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    batches = [(data.x_train[:SAMPLES], data.y_train[:SAMPLES])]
    top = top_eigenvalues(model, mean_loss("classification"), batches, k=1, seed=0).values[0]
    assert abs(top - result["eigenvalues"]["top"][0]) <= 1e-4 * abs(result["eigenvalues"]["top"][0])
    errors = result["lanczos_median_error"]
    assert errors[0] > 0.1 and errors[-1] < 1e-8  # one product is a Rayleigh quotient; twelve have converged
    needed = result["products_needed"]["lanczos"]
    assert needed["unreached"] == 0 and 2 <= needed["median"] <= needed["max"] <= 12
