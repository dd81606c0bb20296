import json
import subprocess
import sys

from samlab.stability import predicts_divergence


def samlab(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "samlab", *args], capture_output=True, text=True, timeout=timeout)


def test_analyze_runs_a_task_in_process_and_matches_the_library(tmp_path):
    out = tmp_path / "grid.json"
    done = samlab("analyze", "stability", "--set", "mode=grid", "--set", "Bs=[2,40]", "--set", "sigmas=[1,30]",
                  "--set", "repeats=2", "--set", "steps=50", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result and result["complete"] is True
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
