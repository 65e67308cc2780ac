"""gpu_check.sh on a CPU: its refusals, and how it reports sections that pass, fail or time out, run with
stand-in Pythons (small shell scripts that claim CUDA and answer each command with a chosen exit code);
and the training comparison of its section 4, run against a stand-in train.py."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["CUDA tests", "offload at the GPT-2-small shape", "decode: generation tok/s", "compiled training"]


def gpu_check(tmp_path, python, limits=None):
    """Runs the repository's gpu_check.sh; its report and temporary folder go under tmp_path."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHON=python, REPORT=str(tmp_path / "report.txt"), TMPDIR=str(tmp_path / "tmp"))
    env.pop("NANOSTEM_SHAKESPEARE", None)
    if limits:
        env["GPU_CHECK_LIMITS"] = limits
    return subprocess.run(["bash", os.path.join(ROOT, "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=60)


def stand_in(tmp_path, cases):
    """A 'python' that logs its arguments and answers as the first matching shell pattern says."""
    path = tmp_path / "python"
    body = "".join(f"  {pattern}) {action};;\n" for pattern, action in cases)
    path.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\ncase "$*" in\n{body}esac\nexit 0\n')
    path.chmod(0o755)
    return str(path)


CLAIMS_CUDA = [("*is_available*|*'import numpy'*", "exit 0")]


def outcomes(p):
    """The summary's outcome of each section, in order."""
    summary = p.stdout.split("# summary")[1]
    return [re.search(rf"^{i}\. {re.escape(title)}.*?: (PASS|FAIL|TIMED OUT)", summary, re.M)[1]
            for i, title in enumerate(SECTIONS, 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refusals_are_one_line_and_write_nothing(tmp_path):
    p = gpu_check(tmp_path, sys.executable)  # this Python: torch without CUDA
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "needs a CUDA GPU" in p.stderr
    p = gpu_check(tmp_path, stand_in(tmp_path, [("*numpy*", "exit 1")]))  # CUDA, but no numpy
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "needs numpy" in p.stderr
    p = gpu_check(tmp_path, stand_in(tmp_path, []), limits="90 210 60")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not four numbers" in p.stderr
    assert not (tmp_path / "report.txt").exists() and not os.listdir(tmp_path / "tmp")


def test_every_section_fails(tmp_path):
    p = gpu_check(tmp_path, stand_in(tmp_path, CLAIMS_CUDA + [("*'import pytest'*", "exit 0"), ("*", "exit 3")]))
    assert p.returncode == 1, p.stdout + p.stderr
    assert outcomes(p) == ["FAIL"] * 4 and p.stdout.count("FAIL (exit code 3)") == 8  # each section, the summary
    assert "# GPU: unknown" in p.stdout and "# data: " in p.stdout
    assert (tmp_path / "report.txt").read_text() == p.stdout  # the report is what was printed
    assert not os.listdir(tmp_path / "tmp")  # made data and runs are removed


def test_every_section_passes_with_the_commands_it_names(tmp_path):
    p = gpu_check(tmp_path, stand_in(tmp_path, []))
    assert p.returncode == 0 and outcomes(p) == ["PASS"] * 4, p.stdout + p.stderr
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    assert f"| commit {commit.stdout.strip() or 'unknown'}" in p.stdout.splitlines()[0]
    calls = (tmp_path / "calls").read_text()
    assert "-m pytest -q -rs -k cuda tests/" in calls
    data = "data/shakespeare-gpt2" if os.path.exists(os.path.join(ROOT, "data/shakespeare-gpt2/meta.json")) else \
        str(tmp_path / "tmp")  # else the Zipf stand-in, made in the temporary folder
    assert re.search(rf"bench.py --mode offload --data_dir={re.escape(data)}", calls)
    assert re.search(rf"bench.py --mode decode --data_dir={re.escape(data)}", calls)


def test_missing_pytest_fails_section_one(tmp_path):
    p = gpu_check(tmp_path, stand_in(tmp_path, [("*'import pytest'*", "exit 1")]))
    assert p.returncode == 1 and outcomes(p) == ["FAIL", "PASS", "PASS", "PASS"]
    assert "1. CUDA tests: FAIL (pytest is not installed" in p.stdout


def test_a_section_past_its_limit_times_out(tmp_path):
    p = gpu_check(tmp_path, stand_in(tmp_path, [("*--mode?decode*", "exec sleep 30")]), limits="9 9 0.5 9")
    assert p.returncode == 1 and outcomes(p) == ["PASS", "PASS", "TIMED OUT", "PASS"]
    assert "TIMED OUT (limit 0.5s, exit code 124)" in p.stdout


def section4(tmp_path, offload, lazy):
    """Section 4's Python, taken from gpu_check.sh, in a folder whose train.py writes the given losses."""
    script = open(os.path.join(ROOT, "gpu_check.sh")).read()
    code = re.search(r"\n(# Both runs.*?)\nEOF\n", script, re.S)[1]
    (tmp_path / "train.py").write_text(
        "import json, os, sys\n"
        "out = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--out_dir='))\n"
        f"losses = json.loads({json.dumps(offload)!r} if '--offload=True' in sys.argv else {json.dumps(lazy)!r})\n"
        "os.makedirs(out)\n"
        "with open(out + '/metrics.jsonl', 'w') as f:\n"
        "    f.write(json.dumps(dict(kind='eval', iter=0, val_loss=9.0)) + '\\n')\n"
        "    for i, x in enumerate(losses):\n"
        "        f.write(json.dumps(dict(kind='train', iter=i + 1, loss=x)) + '\\n')\n")
    return subprocess.run([sys.executable, "-", "data", str(tmp_path / "runs")], input=code, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("change, ok", [(0.004, True), (0.006, False), ("short", False), ("nan", False)])
def test_section4_compares_the_losses_within_its_bound(tmp_path, change, ok):
    lazy = [10.0 - 0.2 * i for i in range(20)]
    offload = list(lazy)
    if change == "short":
        offload.pop()
    elif change == "nan":
        offload[7] = float("nan")
    else:
        offload[12] *= 1 + change  # one step off by this much, relative
    p = section4(tmp_path, offload, lazy)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    assert "largest relative loss difference" in p.stdout
