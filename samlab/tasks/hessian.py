"""Background task "hessian": spectrum, trace, density and per-layer table of one checkpoint.

Stages run in turn; each finished stage is saved to the task's workdir and published with
`reporter.result`, and `resume` skips the saved stages:
- "spectrum": top-k and bottom-k eigenvalues from one Lanczos run, whose first `density_steps` steps
  are also the density's first quadrature run (`extreme_eigenvalues`);
- "trace": Hutch++ on the whole Hessian, whose products also give every layer's block trace;
- "density": the remaining quadrature runs;
- "layer:NAME" per layer: λ_max of the layer's block (Lanczos on it alone), and its block trace: exact
  (one product per parameter) when the layer has at most `layer_trace_samples` (default
  `trace_samples`) parameters, else the trace stage's estimate with its standard error, or, with
  `layer_trace_samples` set, a Hutch++ run of that budget on the layer's block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samlab.checkpoints import Trained, file_digest, load_trained
from samlab.devices import resolve_device
from samlab.hessian import extreme_eigenvalues, hessian_trace, layer_groups, spectral_density, top_eigenvalues
from samlab.losses import mean_loss
from samlab.reporting import Reporter
from samlab.tasks.protocol import PartReporter, TaskState, batches, seeded_subset
from samlab.tensors import MODES
from samlab.validation import (
    check_bool,
    check_checkpoint_file,
    check_choice,
    check_device_name,
    check_int,
    check_known_fields,
    check_optional_int,
)

TASK_DEFAULTS: dict[str, Any] = {
    "k": 5,  # top-k (and, with "smallest", bottom-k) eigenvalues
    "smallest": True,
    "n_samples": 512,  # a seeded subset of the train split (None: all of it)
    "batch_size": 256,
    "trace_samples": 99,  # Hutch++ budget
    # per-layer traces: None takes them from the trace stage's products; a number: a Hutch++ run of that
    # budget per layer (smaller standard errors, a run per layer); layers this small or smaller: exact
    "layer_trace_samples": None,
    "density": True,
    "density_runs": 3,
    "density_steps": 60,
    "per_layer": True,
    "mode": "eval",
    "seed": 0,
    "tol": 1e-4,
    "max_iter": 300,
    "device": "auto",
}
STATE_FILE = "hessian_state.json"


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill in a Hessian request (ValueError naming the field).

    {"checkpoint": path, "k", "smallest", "n_samples", "batch_size", "trace_samples", "layer_trace_samples", "density",
    "density_runs", "density_steps", "per_layer", "mode": "eval"|"train", "seed", "tol", "max_iter",
    "device"}; "digest" (sha256 of the checkpoint file) is filled in, so a checkpoint trained further is
    a new request for the run store's cache.
    """
    check_known_fields(params, {*TASK_DEFAULTS, "checkpoint", "digest"})
    p = {**TASK_DEFAULTS, **params}
    p["checkpoint"] = check_checkpoint_file("checkpoint", p.get("checkpoint"))
    check_int("k", p["k"], 1, 100)
    check_int("batch_size", p["batch_size"], 1, 1_000_000)
    check_int("trace_samples", p["trace_samples"], 6, 100_000)
    check_int("density_runs", p["density_runs"], 1, 100)
    check_int("density_steps", p["density_steps"], 2, 1000)
    check_int("seed", p["seed"], 0, 2**31 - 1)
    check_int("max_iter", p["max_iter"], 2 * p["k"] if p["smallest"] is True else p["k"], 1_000_000)
    check_optional_int("n_samples", p["n_samples"], 1, 100_000_000)
    check_optional_int("layer_trace_samples", p["layer_trace_samples"], 6, 100_000)
    for name in ("smallest", "density", "per_layer"):
        check_bool(name, p[name])
    check_choice("mode", p["mode"], MODES)
    if isinstance(p["tol"], bool) or not isinstance(p["tol"], (int, float)) or not 0 < p["tol"] < 1:
        raise ValueError(f"tol: must be in (0, 1) (got {p['tol']!r})")
    check_device_name(p["device"])
    p["digest"] = file_digest(p["checkpoint"])
    return p


def run_task(params: dict[str, Any], reporter: Reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    """Background task "hessian" (see the module docstring). A stop request ends the task after the
    current stage with "complete": false."""
    p = check_task(params)
    trained = load_trained(p["checkpoint"], device=resolve_device(p["device"]))
    state = TaskState(workdir, STATE_FILE, "hessian", p)
    return _HessianJob(p, trained, reporter, state, resume).run()


class _HessianJob:
    def __init__(self, p: dict[str, Any], trained: Trained, reporter: Reporter, state: TaskState,
                 resume: bool) -> None:
        self.p, self.trained, self.reporter, self.state = p, trained, reporter, state
        self.loss_fn = mean_loss(trained.data.task)
        x, y = seeded_subset(trained.data.x_train, trained.data.y_train, p["n_samples"], p["seed"])
        self.batches = batches(x, y, p["batch_size"])
        self.layers = layer_groups(trained.model)
        self.stages = self._stages()
        saved = state.load(resume)
        self.result = saved["result"] if saved is not None else self._header()
        # shared between stages, kept in the state only: the density's first run, the block traces
        self.shared = saved.get("shared", {}) if saved is not None else {}

    def _stages(self) -> list[tuple[str, Any]]:
        stages: list[tuple[str, Any]] = [("spectrum", None), ("trace", None)]
        if self.p["density"]:
            stages.append(("density", None))
        if self.p["per_layer"]:
            stages += [(f"layer:{layer}", names) for layer, names in self.layers.items()]
        return stages

    def _header(self) -> dict[str, Any]:
        t, p = self.trained, self.p
        return {
            "checkpoint": p["checkpoint"], "label": t.config.label(), "method": t.config.optim.method,
            "lr": t.config.optim.lr, "epoch": t.epoch, "step": t.step, "mode": p["mode"], "seed": p["seed"],
            "n_samples": sum(len(x) for x, _ in self.batches),
            "n_params": sum(p_.numel() for p_ in t.model.parameters() if p_.requires_grad),
            "done": [], "complete": False, "per_layer": [],
        }  # fmt: skip

    def run(self) -> dict[str, Any]:
        for index, (stage, names) in enumerate(self.stages):
            if stage in self.result["done"]:
                continue
            if self.reporter.should_stop():
                break
            stage_reporter = PartReporter(self.reporter, index, 1, len(self.stages), stage)
            output = self._compute(stage, names, stage_reporter)
            if self.reporter.should_stop():  # the stage was cut short: not kept
                break
            self._store(stage, output)
            self.result["done"].append(stage)
            self.state.save({"result": self.result, "shared": self.shared})
            self.reporter.result(self.result)
        self.result["complete"] = len(self.result["done"]) == len(self.stages)
        self.reporter.progress(len(self.result["done"]), len(self.stages), "done" if self.result["complete"] else "stopped")
        self.state.save({"result": self.result, "shared": self.shared})
        return self.result

    def _compute(self, stage: str, names, reporter: Reporter) -> dict[str, Any]:
        p, model = self.p, self.trained.model
        common = {"mode": p["mode"], "reporter": reporter}
        if stage == "spectrum":
            r = extreme_eigenvalues(model, self.loss_fn, self.batches, k=p["k"], smallest=p["smallest"], tol=p["tol"],
                                    max_iter=p["max_iter"], seed=p["seed"],
                                    slq_steps=p["density_steps"] if p["density"] else 0, **common)  # fmt: skip
            self.shared["density_first_run"] = r.slq_run
            ends = [r.largest] + ([r.smallest] if r.smallest is not None else [])
            return {e.which: {"values": e.values, "residuals": e.residuals, "converged": e.converged,
                              "n_hvp": r.n_hvp} for e in ends}  # both ends: the n_hvp of the one shared run
        if stage == "trace":
            blocks = self.layers if p["per_layer"] and not p["layer_trace_samples"] else None
            r = hessian_trace(model, self.loss_fn, self.batches, n_samples=p["trace_samples"], seed=p["seed"],
                              blocks=blocks, **common)  # fmt: skip
            self.shared["layer_traces"] = r.blocks
            return {"mean": r.mean, "stderr": r.stderr, "method": r.method, "n_samples": p["trace_samples"],
                    "n_hvp": r.n_hvp}  # fmt: skip
        if stage == "density":
            first = self.shared.get("density_first_run")
            r = spectral_density(model, self.loss_fn, self.batches, n_runs=p["density_runs"],
                                 n_steps=p["density_steps"], seed=p["seed"], first_runs=[first] if first else [],
                                 **common)  # fmt: skip
            return {"grid": r.grid, "density": r.density, "sigma": r.sigma, "nodes": r.nodes,
                    "weights": r.weights, "n_hvp": r.n_hvp}  # fmt: skip
        layer = stage.split(":", 1)[1]
        top = top_eigenvalues(model, self.loss_fn, self.batches, k=1, tol=p["tol"], max_iter=p["max_iter"],
                              seed=p["seed"], params=names, **common)  # fmt: skip
        dim = sum(dict(model.named_parameters())[n].numel() for n in names)
        row = {"layer": layer, "params": names, "n_params": dim, "lambda_max": top.values[0]}
        budget = p["layer_trace_samples"]
        if dim <= (budget or p["trace_samples"]):  # exact in at most the products an estimate would spend
            tr = hessian_trace(model, self.loss_fn, self.batches, method="exact", params=names, **common)
            row.update(trace=tr.mean, trace_stderr=tr.stderr, trace_method="exact")
        elif budget:
            tr = hessian_trace(model, self.loss_fn, self.batches, n_samples=budget, seed=p["seed"], params=names,
                               **common)  # fmt: skip
            row.update(trace=tr.mean, trace_stderr=tr.stderr, trace_method="hutch++")
        elif layer in self.shared.get("layer_traces", {}):  # from the trace stage's products
            row["trace"], row["trace_stderr"] = self.shared["layer_traces"][layer]
            row["trace_method"] = "hutch++ (whole-Hessian products)"
        return row

    def _store(self, stage: str, output: dict[str, Any]) -> None:
        if stage.startswith("layer:"):
            self.result["per_layer"].append(output)
        elif stage == "spectrum":
            self.result["eigenvalues"] = output
        else:
            self.result[stage] = output
