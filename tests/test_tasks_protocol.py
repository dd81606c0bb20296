"""The protocol every analysis task shares: cache keys that see checkpoint bytes, partial state valid
for one request only, progress of a part mapped onto the whole, seeded subsets; and `checkpoint_of`."""

from __future__ import annotations

from pathlib import Path

import torch

from samlab import tasks
from samlab.checkpoints import CHECKPOINT, checkpoint_of, file_digest
from samlab.reporting import RecordingReporter
from samlab.tasks.protocol import PartReporter, TaskState, batches, checkpoint_digests, seeded_subset


def test_checkpoint_of_prefers_the_reported_path_then_the_workdir():
    assert checkpoint_of({"checkpoint_path": "/a/b.pt", "workdir": "/w"}) == "/a/b.pt"
    assert checkpoint_of({"checkpoint_path": None, "workdir": "/w"}) == str(Path("/w") / CHECKPOINT)


def test_every_kind_keys_on_the_checkpoint_bytes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"weights v1")
    for kind, params in [("msharp", {"checkpoint": str(path)}), ("stability", {"checkpoint": str(path)}),
                         ("landscape", {"checkpoints": [str(path)]})]:
        before = tasks.cache_key(kind, params)
        path.write_bytes(b"weights v2")  # the run trained further: same path, new contents
        assert tasks.cache_key(kind, params) != before, kind
        path.write_bytes(b"weights v1")
        assert tasks.cache_key(kind, params) == before, kind
    assert checkpoint_digests({"checkpoints": [str(path), str(tmp_path / "missing.pt")]}) == [file_digest(path), None]
    # a training request names no checkpoint: its key is the params alone
    assert tasks.cache_key("train", {"seed": 1}) != tasks.cache_key("train", {"seed": 2})


def test_saved_state_is_read_back_only_for_the_same_request(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"weights v1")
    params = {"checkpoint": str(path), "seed": 0}
    TaskState(tmp_path / "task", "state.json", "msharp", params).save({"rows": [1, 2]})
    assert TaskState(tmp_path / "task", "state.json", "msharp", params).load(resume=True) == {"rows": [1, 2]}
    assert TaskState(tmp_path / "task", "state.json", "msharp", params).load(resume=False) is None
    assert TaskState(tmp_path / "task", "state.json", "msharp", {**params, "seed": 1}).load(resume=True) is None
    assert TaskState(tmp_path / "task", "state.json", "hessian", params).load(resume=True) is None
    path.write_bytes(b"weights v2")
    assert TaskState(tmp_path / "task", "state.json", "msharp", params).load(resume=True) is None
    assert not list((tmp_path / "task").glob("*.tmp"))  # written through a temporary file and renamed


def test_a_part_reports_on_its_slice_of_the_whole_bar():
    whole = RecordingReporter()
    part = PartReporter(whole, 2, 1, 5, "trace")  # stage 3 of 5
    part.progress(3, 4, "probe 3")
    part.progress(9, 4, "over")  # clipped to its slice
    assert whole.progress_calls == [(2.75, 5, "trace: probe 3"), (3.0, 5, "trace: over")]
    shifted = PartReporter(whole, 10, 6, 18)  # the second surface of 6 points after one of 10
    shifted.progress(4, 6, "4/6")
    assert whole.progress_calls[-1] == (14.0, 18, "4/6")


def test_seeded_subsets_are_repeatable_and_whole_sets_stay_in_order():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    a, b = seeded_subset(x, y, 4, seed=3), seeded_subset(x, y, 4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(set(a[1].tolist())) == 4
    assert torch.equal(a[0][:, 0] / 2, a[1].float())  # rows stay paired with their targets
    assert seeded_subset(x, y, None, seed=3)[1].tolist() == list(range(10))
    assert seeded_subset(x, y, 10, seed=3)[1].tolist() == list(range(10))
    assert [len(b) for b, _ in batches(x, y, 4)] == [4, 4, 2]
