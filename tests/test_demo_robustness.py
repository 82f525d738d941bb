"""The demo's robustness (crosslayer.demo, crosslayer.info's flags), on the CPU.

- every bad flag fails before any work (no data read, no worker started), with exit
  status 2 and a message naming the flag, the value and what is allowed;
- the output directory is checked (a directory, creatable, writable) before training;
- each scheme's result is saved as soon as it finishes: a worker killed mid-run (the
  test hook CROSSLAYER_DEMO_TEST_FAIL, and a real SIGKILL from outside), a worker that
  raises, or a write that fails later keeps the finished ones; `--resume` reuses them
  when the settings match and retrains when they differ;
- a dead worker is reported with its signal, a failing one with its full traceback,
  the other schemes go on, and the exit status is 1.

Runs use the smallest settings (2 layers, d = 32, 2 steps of 2 x 16 bytes); each
scheme's worker costs the spawn and import of torch, a few seconds.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crosslayer import demo, info

ROOT = Path(__file__).resolve().parent.parent

TEST_FAIL_ENV = "CROSSLAYER_DEMO_TEST_FAIL"  # demo.py's test hook (see its docstring)

TINY = ["--steps", "2", "--d-model", "32", "--n-layers", "2", "--seq-len", "16", "--batch-size", "2",
        "--max-train-mib", "0.25", "--max-valid-mib", "0.05", "--no-progress", "--device", "cpu"]


def _needs_demo_deps():
    pytest.importorskip("matplotlib")  # the [demo] extra
    pytest.importorskip("tqdm")


@pytest.fixture
def no_work(monkeypatch):
    """Any data loading or training fails the test: a refusal must come first."""
    def work(*args, **kwargs):
        raise AssertionError("the demo started work before refusing its arguments")

    for name in ("stdlib_bytes", "run_isolated", "train_one"):
        monkeypatch.setattr(demo, name, work)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as ei:
        demo.main(argv)
    assert ei.value.code == 2, ei.value.code
    return capsys.readouterr().err


# ----------------------------------------------------------------- flags, before any work

BAD_FLAGS = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-1"], "--steps must be >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--d-model", "0"], "--d-model must be >= 1, got 0"),
    (["--d-model", "30"], "--d-model 30 is refused by the model"),
    (["--n-layers", "0"], "--n-layers must be >= 1, got 0"),
    (["--n-layers", "200", "--schemes", "mudd"], "--n-layers 200 is refused by the model for scheme 'mudd'"),
    (["--max-train-mib", "0"], "--max-train-mib must be >= "),
    (["--max-valid-mib", "0.00001"], "--max-valid-mib must be >= "),
    (["--max-valid-mib", "nan"], "--max-valid-mib must be a finite number of MiB, got nan"),
    (["--max-train-mib", "inf"], "--max-train-mib must be a finite number of MiB, got inf"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--seed", str(1 << 64)], "--seed must be in [-2**63, 2**64 - 2]"),
    (["--device", "bogus"], "--device must be auto (cuda when available), cpu or cuda[:i], got 'bogus'"),
    (["--device", "meta"], "--device must be auto (cuda when available), cpu or cuda[:i], got 'meta'"),
    (["--schemes", "residual,residual"], "--schemes lists residual more than once"),
    (["--schemes", "residual,bogus"], "--schemes: unknown ['bogus']"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_refused_before_any_work(flags, message, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    err = _refused(TINY + flags + ["--out", str(out)], capsys)
    assert message in err, err
    assert not out.exists()  # refused before the output directory was even made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
def test_cuda_device_without_cuda_is_refused(tmp_path, capsys, no_work):
    err = _refused(TINY + ["--device", "cuda:0", "--out", str(tmp_path)], capsys)
    assert "--device 'cuda:0' needs CUDA" in err, err
    err = _refused(TINY[:-2] + ["--preset", "gpu", "--out", str(tmp_path)], capsys)
    assert "--preset gpu needs a CUDA device" in err, err


def test_every_problem_is_reported_at_once(tmp_path, capsys, no_work):
    err = _refused(TINY + ["--steps", "0", "--batch-size", "0", "--threads", "0", "--out", str(tmp_path)], capsys)
    for flag in ("--steps", "--batch-size", "--threads"):
        assert f"{flag} must be >= 1, got 0" in err, err


@pytest.mark.parametrize("flag", ["--max-train-mib", "--max-valid-mib"])
def test_data_cap_minimum_is_stated_and_is_the_minimum(flag, capsys, no_work):
    """The refusal states the smallest cap that holds one window (--seq-len + 2 bytes);
    that value is accepted, and one byte less is not."""
    with pytest.raises(SystemExit):
        demo.parse_args(TINY + [flag, "0.00001"])
    err = capsys.readouterr().err
    m = re.search(re.escape(flag) + r" must be >= (\S+) \(one window: --seq-len 16 \+ 2 = 18 bytes\), "
                  r"got 1e-05 \(10 bytes\)", err)
    assert m, err
    args = demo.parse_args(TINY + [flag, m.group(1)])
    assert int(getattr(args, flag[2:].replace("-", "_")) * demo.MiB) >= 18
    with pytest.raises(SystemExit):
        demo.parse_args(TINY + [flag, repr(17 / demo.MiB)])


def test_good_flags_pass_validation():
    args = demo.parse_args(TINY + ["--threads", "1", "--seed", "-5", "--schemes", "residual,mudd"])
    assert args.settings["steps"] == 2 and args.settings["d_model"] == 32 and args.device_resolved == "cpu"


def test_info_rejects_unknown_flags(monkeypatch, capsys):
    with pytest.raises(SystemExit) as ei:
        info.main(["--bogus"])
    assert ei.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["python -m crosslayer.info", "--verbose"])  # the `-m` path
    with pytest.raises(SystemExit) as ei:
        info.main()
    assert ei.value.code == 2
    assert "unrecognized arguments: --verbose" in capsys.readouterr().err


# ----------------------------------------------------------------- the output directory, first


def test_out_that_is_a_file_is_refused_first(tmp_path, capsys, no_work):
    _needs_demo_deps()
    f = tmp_path / "a_file"
    f.write_text("x")
    err = _refused(TINY + ["--out", str(f)], capsys)
    assert f"--out {str(f)!r} is not a directory" in err, err
    assert "Traceback" not in err


def test_out_under_a_file_is_refused_first(tmp_path, capsys, no_work):
    _needs_demo_deps()
    f = tmp_path / "a_file"
    f.write_text("x")
    err = _refused(TINY + ["--out", str(f / "sub" / "dir")], capsys)
    assert "cannot be created" in err and f"{str(f)!r} is a file" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions (test_out_unwritable_proc_dir covers root)")
def test_out_unwritable_dir_is_refused_first(tmp_path, capsys, no_work):
    _needs_demo_deps()
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        err = _refused(TINY + ["--out", str(d)], capsys)
    finally:
        d.chmod(0o700)
    assert f"--out {str(d)!r} is not writable" in err, err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, a directory nobody can create files in")
def test_out_unwritable_proc_dir_is_refused_first(capsys, no_work):
    """An existing directory no one (root included) can create a file in: before, the
    demo trained every scheme and then died writing results.json."""
    _needs_demo_deps()
    err = _refused(TINY + ["--out", "/proc/self"], capsys)
    assert "--out '/proc/self' is not writable" in err, err


# ----------------------------------------------------------------- failures keep the finished results


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_killed_worker_keeps_finished_results_and_resume(tmp_path, capsys, monkeypatch):
    """dwa's worker SIGKILLs itself after its first step (the test hook): residual's
    result survives, dwa is reported with its signal, the exit status is 1. A rerun with
    --resume reuses residual's result and trains dwa; a changed setting retrains."""
    _needs_demo_deps()
    out = tmp_path / "out"
    monkeypatch.setenv(TEST_FAIL_ENV, "dwa:kill")
    rc = demo.main(TINY + ["--schemes", "residual,dwa", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert re.search(r"dwa +FAILED: the worker died without reporting a result: killed by SIGKILL", cap.out), cap.out
    assert re.search(r"^residual +49,", cap.out, re.M), cap.out  # the table shows the finished one
    assert re.search(r"^failed:\n  dwa +the worker died .*SIGKILL", cap.out, re.M), cap.out
    assert "--resume to keep residual" in cap.err
    saved = _json(out / "scheme-residual.json")
    assert saved["result"]["scheme"] == "residual" and saved["settings"]["model_and_training"]["steps"] == 2
    assert not (out / "scheme-dwa.json").exists()
    res = _json(out / "results.json")
    assert [r["scheme"] for r in res["results"]] == ["residual"]
    assert [(f["scheme"], f["status"]) for f in res["failed"]] == [("dwa", "died")]
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind

    # resume: residual reused as saved (not retrained: same bytes), dwa trained
    monkeypatch.delenv(TEST_FAIL_ENV)
    before = (out / "scheme-residual.json").read_bytes()
    rc = demo.main(TINY + ["--schemes", "residual,dwa", "--out", str(out), "--resume"])
    cap = capsys.readouterr()
    assert rc == 0, cap
    assert "residual val" in cap.out and "(resumed: saved result with the same settings" in cap.out, cap.out
    assert "resumed from saved results: residual" in cap.out
    assert (out / "scheme-residual.json").read_bytes() == before
    res = _json(out / "results.json")
    assert [r["scheme"] for r in res["results"]] == ["residual", "dwa"] and res["failed"] == []
    assert res["results"][0] == _json(out / "scheme-residual.json")["result"]

    # a different setting: the saved result is not reused
    rc = demo.main(TINY + ["--schemes", "residual", "--steps", "3", "--out", str(out), "--resume"])
    cap = capsys.readouterr()
    assert rc == 0, cap
    assert "different settings (model_and_training.steps: 2 -> 3): training it again" in cap.out, cap.out
    again = _json(out / "scheme-residual.json")
    assert again["settings"]["model_and_training"]["steps"] == 3 and len(again["result"]["train_curve"]) == 3


def test_worker_exception_prints_full_traceback(tmp_path, capsys, monkeypatch):
    _needs_demo_deps()
    monkeypatch.setenv(TEST_FAIL_ENV, "residual:raise")
    rc = demo.main(TINY + ["--schemes", "residual", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert "residual FAILED: RuntimeError: CROSSLAYER_DEMO_TEST_FAIL asked scheme 'residual' to fail" in cap.out
    assert "Traceback (most recent call last)" in cap.err, cap.err
    assert re.search(r'File ".*demo\.py", line \d+, in train_one', cap.err), cap.err  # the worker's frames
    assert "no scheme finished" in cap.out
    assert _json(tmp_path / "results.json")["failed"][0]["error"].startswith("Traceback")


def test_later_write_failure_keeps_earlier_results(tmp_path, capsys, monkeypatch):
    """The directory stops taking files after residual finished (simulated: root ignores
    permissions): dwa's result and results.json fail to write, the run still prints the
    whole table, says what it could not write, and keeps residual's saved result."""
    _needs_demo_deps()
    real = demo.write_atomic

    def write_atomic(path, text):
        if path.name in ("scheme-dwa.json", "results.json"):
            raise PermissionError(13, "Permission denied", str(path))
        real(path, text)

    monkeypatch.setattr(demo, "write_atomic", write_atomic)
    rc = demo.main(TINY + ["--schemes", "residual,dwa", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert re.search(r"^residual +49,", cap.out, re.M) and re.search(r"^dwa +49,", cap.out, re.M), cap.out
    assert "dwa      val" in cap.out and "NOT saved" in cap.out
    assert "could not write" in cap.err and "results.json" in cap.err and "scheme-dwa.json" in cap.err
    assert _json(tmp_path / "scheme-residual.json")["result"]["scheme"] == "residual"


def _children(pid: int):
    """Child pids of pid (from /proc/*/stat)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker through Linux /proc")
def test_worker_killed_from_outside(tmp_path):
    """A real SIGKILL from outside (as the OOM killer sends) to the first scheme's worker:
    before, the parent waited forever; now it reports the signal, trains the second
    scheme and exits 1."""
    _needs_demo_deps()
    env = dict(os.environ)
    env.pop(TEST_FAIL_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "crosslayer.demo", *TINY, "--schemes", "residual,dwa",
                             "--out", str(tmp_path)], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.time() + 120
        while killed is None and time.time() < deadline and proc.poll() is None:
            for kid in _children(proc.pid):
                try:
                    cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"spawn_main" in cmdline:  # a worker, not the resource tracker
                    os.kill(kid, signal.SIGKILL)
                    killed = kid
                    break
            time.sleep(0.05)
        assert killed is not None, "no worker process appeared"
        stdout, stderr = proc.communicate(timeout=120)  # before: never returned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stdout + stderr
    assert re.search(r"residual +FAILED: the worker died without reporting a result: killed by SIGKILL", stdout), \
        stdout + stderr
    assert re.search(r"^dwa +49,", stdout, re.M), stdout + stderr
    assert _json(tmp_path / "scheme-dwa.json")["result"]["scheme"] == "dwa"
    assert [f["scheme"] for f in _json(tmp_path / "results.json")["failed"]] == ["residual"]
