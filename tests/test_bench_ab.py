"""bench/ab.sh on the CPU: a branch (here a copy of this checkout's package and kernels) and this
checkout run alternately, each from its own tree, and each arm's lines land in OUT/ab.txt.  On a
machine without a GPU each arm runs the bench's CPU reference path, which says so."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--ranks 1 --experts 8 --tokens 2 --hidden 256"


def _run(tmp_path, branch_dir, **env):
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], AB_DIR=str(branch_dir),
                       AB_ROUNDS="1")
    environment.update({"AB_ARGS": TINY, **env})
    return subprocess.run(["bash", str(ROOT / "bench" / "ab.sh"), str(tmp_path / "out")], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_arms_run_their_own_trees_and_log_to_ab_txt(tmp_path):
    branch = tmp_path / "branch"
    for part in ("lowlat", "kernels", "graphs"):
        shutil.copytree(ROOT / part, branch / part, ignore=shutil.ignore_patterns("__pycache__"))
    done = _run(tmp_path, branch, AB_ENV="LOWLAT_TRACE=0")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out" / "ab.txt").read_text()
    arms = [line for line in log.splitlines() if line.startswith("== ")]
    assert arms == ["== main", "== branch", "== branch+LOWLAT_TRACE=0"]
    packages = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("package: ")]
    assert packages == [str(ROOT / "lowlat" / "__init__.py"), str(branch / "lowlat" / "__init__.py"),
                        str(branch / "lowlat" / "__init__.py")]
    assert log.count("correct: ") == 3, log


def test_a_missing_worktree_is_named(tmp_path):
    done = _run(tmp_path, tmp_path / "nowhere")
    assert done.returncode == 1 and f"no worktree in {tmp_path / 'nowhere'}" in done.stdout


def test_several_worktrees_are_arms_named_by_folder(tmp_path):
    trees = [tmp_path / "v1", tmp_path / "v2"]
    for tree in trees:
        for part in ("lowlat", "kernels", "graphs"):
            shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    done = _run(tmp_path, " ".join(map(str, trees)))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out" / "ab.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith("== ")] == ["== main", "== v1", "== v2"]
    packages = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("package: ")]
    assert packages == [str(ROOT / "lowlat" / "__init__.py")] + [str(tree / "lowlat" / "__init__.py") for tree in trees]


def test_another_module_runs_in_every_arm_with_its_whole_output(tmp_path):
    branch = tmp_path / "branch"
    for part in ("lowlat", "kernels", "graphs"):
        shutil.copytree(ROOT / part, branch / part, ignore=shutil.ignore_patterns("__pycache__"))
    done = _run(tmp_path, branch, AB_MODULE="lowlat.bench.trace", AB_ARGS="--tokens 1")
    log = (tmp_path / "out" / "ab.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith("== ")] == ["== main", "== branch"]
    # On a machine without a GPU the trace says so (exit 2), in each arm, and ab.sh fails.
    assert log.count("it needs an NVIDIA GPU, and this machine has none") == 2, log
    assert done.returncode == 1


def test_the_callers_pythonpath_follows_the_arms_tree(tmp_path):
    # What gpu_check.sh puts on the path (a DeepEP build for --baseline deepep) stays importable, and
    # each arm's own package still comes first.
    branch = tmp_path / "branch"
    for part in ("lowlat", "kernels", "graphs"):
        shutil.copytree(ROOT / part, branch / part, ignore=shutil.ignore_patterns("__pycache__"))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "abprobe.py").write_text("import lowlat\nprint('probe:', lowlat.__file__)\n")
    done = _run(tmp_path, branch, AB_MODULE="abprobe", AB_ARGS="", PYTHONPATH=str(extra))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out" / "ab.txt").read_text()
    probes = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("probe: ")]
    assert probes == [str(ROOT / "lowlat" / "__init__.py"), str(branch / "lowlat" / "__init__.py")]
