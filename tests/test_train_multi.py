"""``python -m spm train --jobs``: the jobs file, the summary, interruption and re-runs, and two processes
under ``accelerate launch`` (CPU, gloo), all on the shipped toy model with a few iterations per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spm.checkpoint import load_membrane
from spm.cli import main
from spm.train.multi import JobsFileError, Summary, assign, default_summary, load_jobs, run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = {"iterations": 3, "pool_size": 2, "max_denoising_steps": 4, "anchors": 1}


@pytest.fixture(scope="module")
def toy_pipe():
    from spm.toy.model import load_toy_pipeline

    return load_toy_pipeline("base")


@pytest.fixture(scope="module")
def toy_dir(toy_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "pipe"
    toy_pipe.save_pretrained(str(d))
    return d


def write_jobs(folder: Path, names, fmt="yaml", **defaults) -> Path:
    import yaml

    data = {"defaults": {**TINY, **defaults},
            "jobs": [{"name": n, "targets": [n], "output": f"out/{n}.safetensors"} for n in names]}
    p = folder / f"jobs.{fmt}"
    p.write_text(yaml.safe_dump(data) if fmt == "yaml" else json.dumps(data))
    return p


def test_bad_jobs_files_get_one_line_errors_naming_entry_and_field(tmp_path):
    def err(text, name="jobs.yaml"):
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(JobsFileError) as e:
            load_jobs(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg
        return msg

    assert "job 2 (b)" in err("jobs:\n- {targets: [a], output: a.safetensors}\n- {name: b, targets: [b], output: b.safetensors,"
                              " overrides: {lr: -1}}\n") and "lr=-1" in err(
        "- {targets: [a], output: a.safetensors, overrides: {lr: -1}}\n")
    assert "'overrides.lrr'" in err("- {targets: [a], output: a.safetensors, overrides: {lrr: 1}}\n")
    m = err("- {targets: [a], output: a.safetensors, iterations: 5}\n")
    assert "'iterations'" in m and "overrides" in m
    assert "'output'" in err("- {targets: [a]}\n")
    assert "'targets'" in err("- {output: a.safetensors}\n")
    assert ".safetensors" in err("- {targets: [a], output: a.pt}\n")
    assert "'preset'" in err("- {targets: [a], output: a.safetensors, preset: nope}\n")
    assert "repeats job 1" in err("- {targets: [a], output: a.safetensors}\n- {targets: [b], output: a.safetensors}\n")
    assert "not valid JSON" in err("[{", "jobs.json")
    assert "non-empty list" in err("jobs: []\n")
    assert "defaults.lrr" in err("defaults: {lrr: 1}\njobs:\n- {targets: [a], output: a.safetensors}\n")


def test_settings_precedence_and_relative_outputs(tmp_path):
    p = tmp_path / "sub" / "jobs.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"defaults": {"iterations": 7, "lr": 0.5},
                             "jobs": [{"targets": "circle, ring", "preset": "style", "output": "c.safetensors",
                                       "overrides": {"lr": 0.25}}]}))
    (job,) = load_jobs(p, {"iterations": 9, "seed": 3})
    cfg = job.config
    assert cfg.targets == ["circle", "ring"] and cfg.anchors == 6  # style preset
    assert cfg.iterations == 9 and cfg.lr == 0.25 and cfg.seed == 3  # defaults < command line < overrides
    assert job.output == p.parent / "c.safetensors" and job.name == "c"


def test_assignment_is_deterministic_disjoint_and_balanced(tmp_path):
    p = tmp_path / "jobs.yaml"
    p.write_text("\n".join(f"- {{targets: [t{i}], output: t{i}.safetensors, overrides: {{iterations: {it}}}}}"
                           for i, it in enumerate([100, 10, 10, 90, 10, 10])))
    jobs = load_jobs(p)
    shares = assign(jobs, 2)
    assert shares == assign(load_jobs(p), 2)
    names = [j.name for s in shares for j in s]
    assert sorted(names) == sorted(j.name for j in jobs) and len(set(names)) == len(names)
    loads = [sum(j.config.iterations for j in s) for s in shares]
    assert max(loads) - min(loads) <= 10


def test_one_process_trains_all_then_rerun_skips(toy_dir, tmp_path, capsys):
    jobs = write_jobs(tmp_path, ["circle", "square"])
    rc = main(["train", "--model", str(toy_dir), "--jobs", str(jobs), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "jobs.json").read_text())
    assert summary["mode"] == "sequential" and summary["counts"]["done"] == 2
    for n in ("circle", "square"):
        e = summary["jobs"][n]
        assert e["status"] == "done" and e["steps"] == 3 and e["seconds"] > 0 and e["error"] is None
        assert "erasure" in e and load_membrane(tmp_path / "out" / f"{n}.safetensors").concepts == [n]
    assert main(["train", "--model", str(toy_dir), "--jobs", str(jobs), "--summary", str(jobs)]) == 2
    assert "the jobs file itself" in capsys.readouterr().err
    mtime = (tmp_path / "out" / "circle.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--model", str(toy_dir), "--jobs", str(jobs), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [j["status"] for j in report["jobs"]] == ["skipped", "skipped"]
    assert (tmp_path / "out" / "circle.safetensors").stat().st_mtime_ns == mtime
    # other settings for a finished output: refused without --overwrite, with a one-line reason
    assert main(["train", "--model", str(toy_dir), "--jobs", str(jobs), "--device", "cpu", "--lr", "0.01"]) == 1
    e = json.loads((tmp_path / "jobs.json").read_text())["jobs"]["circle"]
    assert e["status"] == "failed" and "--overwrite" in e["error"]
    # --jobs replaces --target/-o; without --jobs they are required
    assert main(["train", "--model", str(toy_dir), "--jobs", str(jobs), "--target", "x"]) == 2
    assert main(["train", "--model", str(toy_dir)]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_interrupt_loses_nothing_and_rerun_resumes(toy_pipe, tmp_path):
    """Stop during the second job (an event set from the progress callback, not a timer): the first is
    done, the second saved as interrupted, the third pending; the re-run skips, resumes and finishes."""
    from spm.hosts.diffusers import DiffusersBackend

    path = write_jobs(tmp_path, ["circle", "square", "star"], fmt="json")
    jobs = load_jobs(path)
    summary = Summary(default_summary(path), path, "sequential", 1)
    assert summary.path.name == "jobs.summary.json"  # the jobs file is jobs.json: the summary goes beside it
    stop = threading.Event()

    def progress(job, p):
        if job.name == "square" and p.step == 1:
            stop.set()

    reports = run_jobs(jobs, lambda: DiffusersBackend(toy_pipe), summary, should_stop=stop.is_set, on_progress=progress)
    assert [r["status"] for r in reports] == ["done", "interrupted", "pending"]
    data = summary.read()["jobs"]
    assert data["circle"]["status"] == "done" and data["square"]["status"] == "interrupted"
    assert data["square"]["steps"] == 1 and data["star"]["status"] == "pending"
    assert load_membrane(tmp_path / "out" / "square.safetensors").info.training["steps_done"] == 1
    reports = run_jobs(load_jobs(path), lambda: DiffusersBackend(toy_pipe), summary)
    assert [r["status"] for r in reports] == ["skipped", "done", "done"], reports[1].get("error")
    assert reports[1]["resumed_from"] == 1 and reports[1]["steps"] == 3
    data = summary.read()
    assert data["counts"]["done"] == 2 and data["counts"]["skipped"] == 1
    assert all(load_membrane(tmp_path / "out" / f"{n}.safetensors").info.training["steps_done"] == 3
               for n in ("circle", "square", "star"))


def _accelerate(args, cwd, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spm", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_under_accelerate_train_disjoint_membranes(toy_dir, tmp_path):
    pytest.importorskip("accelerate")
    path = write_jobs(tmp_path, ["circle", "square", "star"])
    proc = _accelerate(["--model", str(toy_dir), "--jobs", str(path), "--device", "cpu", "--threads", "1"], ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "jobs.json").read_text())
    assert summary["mode"] == "concept-parallel" and summary["processes"] == 2
    assert summary["counts"]["done"] == 3
    ranks = {n: e["rank"] for n, e in summary["jobs"].items()}
    want = {j.name: r for r, share in enumerate(assign(load_jobs(path), 2)) for j in share}
    assert ranks == want and set(ranks.values()) == {0, 1}
    reports = [json.loads(chunk) for chunk in _json_objects(proc.stdout)]
    trained = [[j["output"] for j in r["jobs"]] for r in sorted(reports, key=lambda r: r["rank"])]
    assert len(trained) == 2 and not set(trained[0]) & set(trained[1])
    assert sorted(Path(o).stem for t in trained for o in t) == ["circle", "square", "star"]


def _json_objects(text: str):
    """The pretty-printed JSON objects in ``text`` (each process prints one)."""
    dec, i = json.JSONDecoder(), 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        yield json.dumps(obj)
        i = end


@pytest.mark.slow
def test_data_parallel_under_accelerate(toy_dir, tmp_path):
    pytest.importorskip("accelerate")
    path = write_jobs(tmp_path, ["circle"], iterations=4)
    proc = _accelerate(["--model", str(toy_dir), "--jobs", str(path), "--device", "cpu", "--threads", "1",
                        "--data-parallel"], ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    e = json.loads((tmp_path / "jobs.json").read_text())["jobs"]["circle"]
    assert e["status"] == "done" and e["data_parallel"] == {"processes": 2, "iterations_per_process": 2}
    m = load_membrane(tmp_path / "out" / "circle.safetensors")
    assert m.info.training["steps_done"] == 2
    assert not list((tmp_path / "out").glob(".*dp-rank*"))  # the other rank's copies are removed when done
    # a re-run: rank 0 decides for all (rank 1 has no copy left), so every rank skips together
    proc = _accelerate(["--model", str(toy_dir), "--jobs", str(path), "--device", "cpu", "--threads", "1",
                        "--data-parallel"], ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "jobs.json").read_text())["jobs"]["circle"]["status"] == "skipped"


def test_sigterm_stops_the_running_job_and_keeps_the_finished_one(toy_dir, tmp_path):
    """SIGTERM once the second job is running (seen in the summary, not after a delay): the first membrane
    stays done, the second is saved as interrupted (loadable, resumable), the third is still pending."""
    import signal
    import time

    import yaml

    data = {"defaults": TINY, "jobs": [{"name": "circle", "targets": ["circle"], "output": "out/circle.safetensors"},
                                       {"name": "square", "targets": ["square"], "output": "out/square.safetensors",
                                        "overrides": {"iterations": 100000}},
                                       {"name": "star", "targets": ["star"], "output": "out/star.safetensors"}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "spm", "train", "--model", str(toy_dir), "--jobs", str(path),
                             "--device", "cpu", "--threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary = tmp_path / "jobs.json"
    try:
        deadline = time.monotonic() + 300  # a safety net for a hung child only; the test waits on the summary
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                jobs = json.loads(summary.read_text())["jobs"]
            except (OSError, ValueError, KeyError):
                jobs = {}
            if jobs.get("square", {}).get("status") == "running":
                break
            assert time.monotonic() < deadline, "the second job never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    jobs = json.loads(summary.read_text())["jobs"]
    assert jobs["circle"]["status"] == "done" and jobs["square"]["status"] == "interrupted"
    assert jobs["star"]["status"] == "pending"
    steps = load_membrane(tmp_path / "out" / "square.safetensors").info.training["steps_done"]
    assert steps == jobs["square"]["steps"] < 100000
    assert load_membrane(tmp_path / "out" / "circle.safetensors").info.training["steps_done"] == 3
