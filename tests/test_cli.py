import json
import os
import pty
import subprocess
import sys

import pytest

from samlab.cli import result_summary
from samlab.cli_runs import progress_bar, wait_progress
from samlab.runs.store import Store
from samlab.stability import predicts_divergence


def samlab(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "samlab", *args], capture_output=True, text=True, timeout=timeout)


def test_analyze_runs_a_task_in_process_and_matches_the_library(tmp_path):
    out = tmp_path / "grid.json"
    done = samlab("analyze", "stability", "--set", "mode=grid", "--set", "Bs=[2,40]", "--set", "sigmas=[1,30]",
                  "--set", "repeats=2", "--set", "steps=50", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["complete"] is True
    # with --out, stdout is a short summary that names the file, not the JSON
    lines = done.stdout.splitlines()
    assert len(lines) <= 14 and lines[-1].endswith(f"written to {out}")
    assert any(line.split() == ["complete", "True"] for line in lines)
    # the theorem's verdicts in the result are the library's, cell by cell
    for row in result["rows"]:
        expected = [predicts_divergence(2.0, row["sigma"], 0.8, b, 100) for b in (2, 40)]
        assert row["predicted"] == expected
    assert [row["predicted"] for row in result["rows"]] == [[True, True], [False, False]]


def test_analyze_refuses_bad_parameters_with_one_line():
    done = samlab("analyze", "stability", "--set", "mode=grid", "--set", "repeats=0")
    assert done.returncode == 2
    assert done.stderr.startswith("error: repeats:") and "Traceback" not in done.stderr
    done = samlab("analyze", "train")
    assert done.returncode == 2 and "use `python -m samlab train`" in done.stderr


def test_analyze_out_prints_the_headline_numbers_of_a_hessian(tmp_path):
    from tests.helpers import stored_trained_run

    _, checkpoint = stored_trained_run(Store(f"sqlite:///{tmp_path / 'runs.db'}"), tmp_path / "run")
    out = tmp_path / "hessian.json"
    done = samlab("analyze", "hessian", "--set", f"checkpoint={checkpoint}", "--set", "k=3", "--set", "n_samples=64",
                  "--set", "trace_samples=12", "--set", "density=false", "--set", "per_layer=false", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    top = result["eigenvalues"]["largest"]["values"]
    lines = done.stdout.splitlines()
    assert len(done.stdout) < 2000 and lines[-1].endswith(f"written to {out}")
    # the top-k eigenvalues and the trace from the file appear in the summary
    assert f"[{', '.join(f'{v:.6g}' for v in top)}]" in done.stdout
    assert any(line.split() == ["trace.mean", f"{result['trace']['mean']:.6g}"] for line in lines)


def test_result_summary_keeps_scalars_and_short_lists_and_caps_its_length():
    result = {"params": {"k": 5}, "key": "abc", "a": 1.23456789, "b": {"c": [1.0, 2.0], "d": list(range(100))},
              "e": True, "f": None, **{f"x{i}": i for i in range(20)}}
    lines = result_summary(result)
    assert lines[0].split() == ["a", "1.23457"] and lines[1].split() == ["b.c", "[1,", "2]"]
    assert lines[2].split() == ["e", "True"] and not any(line.startswith(("params", "key", "b.d", "f ")) for line in lines)
    assert len(lines) == 17 and lines[-1] == "… 7 more fields in the file"


@pytest.fixture
def many_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    Store(url).create_runs([{"kind": "stability", "params": {"i": i}, "name": f"run {i} " + "x" * 60}
                            for i in range(1500)])
    return url


def test_runs_list_into_a_closed_pipe_ends_quietly(many_runs):
    # ~150 kB of listing: more than a pipe holds, so the writer meets the closed pipe
    done = subprocess.run(f"{sys.executable} -m samlab runs list --limit 2000 --store '{many_runs}' | head -n 2",
                          shell=True, capture_output=True, text=True, timeout=120,
                          executable="/bin/bash", env={**os.environ, "PYTHONUNBUFFERED": "0"})
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    assert done.stderr == "", done.stderr
    status = subprocess.run(f"set -o pipefail; {sys.executable} -m samlab runs list --limit 2000 --store "
                            f"'{many_runs}' | head -n 1 >/dev/null", shell=True, executable="/bin/bash",
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 141 and status.stderr == ""  # the SIGPIPE status, no traceback


def _submit_wait(url: str, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "samlab", "submit", "--preset", "digits-mlp", "--set", "epochs=2",
                             "--set", "data.n_train=256", "--set", "model.width=8", "--seeds", "0,1", "--wait",
                             "--store", url], stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_submit_wait_prints_one_line_per_change_into_a_pipe(tmp_path):
    proc = _submit_wait(f"sqlite:///{tmp_path / 'runs.db'}", subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert "\r" not in err and lines[-1] == "2/2 finished, 100%"
    assert len(lines) == len(set(lines)) <= 2 * 11  # each line says something new
    assert out.splitlines()[-1].endswith("completed")


def test_submit_wait_draws_a_bar_on_a_terminal(tmp_path):
    main, follower = pty.openpty()
    proc = _submit_wait(f"sqlite:///{tmp_path / 'runs.db'}", follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal's other end closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    os.close(main)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    assert text.count("\r[") >= 2 and f"[{'#' * 30}] 100.0%  2/2 finished" in text


def test_progress_bar_and_wait_progress():
    runs = [{"status": "completed", "progress": 0.5}, {"status": "running", "progress": 0.25},
            {"status": "queued", "progress": None}]
    done, fraction = wait_progress(runs)
    assert done == 1 and fraction == pytest.approx(1.25 / 3)
    assert progress_bar(done, 3, fraction) == f"[{'#' * 12}{'·' * 18}]  41.7%  1/3 finished"


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's mallopt")  # fmt: skip
def test_the_allocator_keeps_freed_memory_under_glibc():
    from samlab.devices import retain_freed_memory

    assert retain_freed_memory() is True  # glibc accepted every setting (mallopt answers 0 for one it refuses)
