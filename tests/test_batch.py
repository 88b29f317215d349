"""`lmgen batch` as a subprocess: rows to output and errors, seeds that ignore batching, resuming after kill -9
(each id exactly once), Parquet, and the same job on a real Ray instance the tests start on the loopback: its
output equal to the local run's, a worker actor killed mid-job, the driver killed and the job rerun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import make_tiny_llama
from .test_server import free_port

ROWS = 48


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("batch-model") / "model", max_position_embeddings=512)


def write_input(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good_rows(n: int = ROWS) -> list[dict]:
    rows = [{"id": f"row-{i}", "prompt": f"Row {i} begins", "max_tokens": 24 + i % 7, "temperature": 0.9}
            for i in range(n)]
    rows[1] = {"id": "row-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}  # no template: error
    rows[2].update(n=2, logprobs=2, max_tokens=6)
    rows[3].update(temperature=0)
    return rows


def batch(*args: str, wait: bool = True, **kw):
    cmd = [sys.executable, "-m", "lmgen", "batch", "-q", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same(out: Path, reference: Path) -> bool:
    """The same rows in the same order, texts, finish reasons and token counts exactly; logprobs to 1e-4 (float32
    matmuls round a row's last bits differently with the rows beside it; the tokens do not change)."""
    def key(value):
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, list):
            return [key(v) for v in value]
        return {k: key(v) for k, v in value.items()} if isinstance(value, dict) else value

    a, b = lines(out), lines(reference)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "logprobs"} == {k: v for k, v in y.items() if k != "logprobs"}
        if "logprobs" in x:
            assert all(abs(key(p["logprob"]) - key(q["logprob"])) <= 1e-4 and p["token"] == q["token"]
                       for u, v in zip(x["logprobs"], y["logprobs"]) for p, q in zip(u, v))
    return True


def parts_of(output: Path) -> list[Path]:
    folder = output.with_name(output.name + ".parts")
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def kill_after_first_part(proc: subprocess.Popen, output: Path, kill=None) -> int:
    """kill -9 (the process, or `kill()`'s choice) once a part is committed; the parts there then."""
    deadline = time.monotonic() + 300
    while not parts_of(output):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no part was committed"
        time.sleep(0.02)
    (kill or (lambda: os.kill(proc.pid, signal.SIGKILL)))()
    return len(parts_of(output))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    """An uninterrupted local run, one thread (as each Ray worker runs), the default seed."""
    tmp = tmp_path_factory.mktemp("batch-reference")
    out = tmp / "out.jsonl"
    run = batch(str(write_input(tmp / "in.jsonl", good_rows())), str(out), "--model", str(model), "--threads", "1")
    assert run.returncode == 0, run.stderr
    return out


def test_rows_errors_and_a_second_run_agree(model, reference, tmp_path):
    rows = good_rows() + [{"id": "row-0", "prompt": "again"}, {"prompt": "no id"}, "not json",
                          {"id": "bad-field", "prompt": "x", "colour": "red"}, {"id": "bad-value", "prompt": "x",
                                                                                 "top_p": 3}]
    out = tmp_path / "out.jsonl"
    run = batch(str(write_input(tmp_path / "in.jsonl", rows)), str(out), "--model", str(model), "--threads", "1",
                "--chunk-rows", "5")
    assert run.returncode == 0, run.stderr
    assert same(out, reference)  # the same rows, texts and order as the run without the bad ones
    records = lines(out)
    assert [r["id"] for r in records] == [f"row-{i}" for i in range(ROWS) if i != 1]
    assert len(records[1]["text"]) == 2 and 1 <= len(records[1]["logprobs"][0]) <= 6  # n=2 with logprobs
    errors = {(e["id"], e["index"]): e["error"] for e in lines(out.with_name("out.jsonl.errors.jsonl"))}
    assert "no chat template" in errors[("row-1", 1)]
    assert "appears earlier" in errors[("row-0", ROWS)] and "no id" in errors[(None, ROWS + 1)]
    assert "not JSON" in errors[(None, ROWS + 2)] and "colour" in errors[("bad-field", ROWS + 3)]
    assert "top_p" in errors[("bad-value", ROWS + 4)]
    assert not parts_of(out)  # joined and removed


def test_seeds_ignore_the_batching(model, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    run = batch(str(write_input(tmp_path / "in.jsonl", good_rows()[::-1])), str(out), "--model", str(model),
                "--threads", "1", "--max-concurrent", "3")
    assert run.returncode == 0, run.stderr
    order = {r["id"]: i for i, r in enumerate(lines(reference))}
    out.write_text("".join(json.dumps(r) + "\n" for r in sorted(lines(out), key=lambda r: order[r["id"]])))
    assert same(out, reference)


def test_empty_input_and_parquet(model, tmp_path):
    out = tmp_path / "empty.jsonl"
    run = batch(str(write_input(tmp_path / "empty.jsonl.in", [])), str(out), "--model", str(model))
    assert run.returncode == 0 and out.read_text() == "" and "0 rows" in run.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": str(i), "prompt": f"Number {i}", "max_tokens": 4} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    run = batch(str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), "--model", str(model))
    assert run.returncode == 0, run.stderr
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows] and all(r["completion_tokens"] == 4 for r in table)
    bad = batch(str(tmp_path / "missing.jsonl"), str(out), "--model", str(model))
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr


def test_kill_9_then_rerun_finishes_each_id_once(model, reference, tmp_path):
    source = write_input(tmp_path / "in.jsonl", good_rows())
    out = tmp_path / "out.jsonl"
    args = (str(source), str(out), "--model", str(model), "--threads", "1", "--chunk-rows", "4",
            "--max-concurrent", "4")
    proc = batch(*args, wait=False)
    committed = kill_after_first_part(proc, out)
    proc.wait()
    assert 1 <= committed < ROWS // 4  # killed mid-job
    done = sum(len(lines(p)) for p in parts_of(out))
    rerun = batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already done" in rerun.stderr  # the committed rows are not redone
    assert same(out, reference)


def test_a_chunk_written_but_not_renamed_is_redone_once(model, reference, tmp_path):
    """The files a kill leaves between writing a part and renaming it into place (its commit)."""
    out = tmp_path / "out.jsonl"
    records = lines(reference)
    folder = out.with_name("out.jsonl.parts")
    folder.mkdir()
    (folder / "committed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    (folder / "next.jsonl.tmp-4242").write_text("".join(json.dumps(r) + "\n" for r in records[10:20]))
    run = batch(str(write_input(tmp_path / "in.jsonl", good_rows())), str(out), "--model", str(model),
                "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert "10 already done" in run.stderr
    assert same(out, reference) and not folder.exists()


def test_ray_missing_says_how_to_install_it_and_bad_flags_exit_2(model, tmp_path):
    source = write_input(tmp_path / "in.jsonl", good_rows(4))
    code = ("import sys; sys.modules['ray'] = None; from lmgen.cli import main; "
            f"sys.exit(main(['batch', '-q', {str(source)!r}, {str(tmp_path / 'out.jsonl')!r}, '--model', "
            f"{str(model)!r}, '--ray']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "pip install 'lmgen[ray]'" in run.stderr and "Traceback" not in run.stderr
    bad = batch(str(source), str(tmp_path / "out.jsonl"), "--workers", "0", "--ray")
    assert bad.returncode == 2 and "--workers must be >= 1" in bad.stderr


# ------------------------------------------------------------------ Ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on the loopback with 2 CPUs, started for these tests and stopped after."""
    port = free_port()
    # A loopback cluster that lives as long as these tests: no token to share with the drivers they start.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    temp = tmp_path_factory.mktemp("ray")
    start = subprocess.run(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                            "--temp-dir", str(temp)], capture_output=True, text=True, timeout=180, env=env,
                           executable=str(Path(sys.executable).with_name("ray")))
    assert start.returncode == 0, start.stdout + start.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=120)
    os.environ.pop("RAY_AUTH_MODE")


def ray_args(source: Path, out: Path, model: Path, address: str, workers: int) -> tuple[str, ...]:
    return (str(source), str(out), "--model", str(model), "--ray", address, "--workers", str(workers),
            "--cpus-per-worker", "1", "--chunk-rows", "4", "--max-concurrent", "4")


def test_ray_output_equals_the_local_run(model, reference, cluster, tmp_path):
    out = tmp_path / "out.jsonl"
    run = batch(*ray_args(write_input(tmp_path / "in.jsonl", good_rows()), out, model, cluster, 2))
    assert run.returncode == 0, run.stderr
    assert same(out, reference)


def test_ray_worker_killed_mid_job_still_each_id_once(model, reference, cluster, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = batch(*ray_args(write_input(tmp_path / "in.jsonl", good_rows()), out, model, cluster, 1), wait=False)

    def kill_worker():
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and b"MapWorker" in _cmdline(p)]
        assert pids, "no Ray Data worker process found"
        os.kill(pids[0], signal.SIGKILL)

    committed = kill_after_first_part(proc, out, kill_worker)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert 1 <= committed < ROWS // 4  # the actor died after a committed part, before the last
    assert same(out, reference)


def test_ray_driver_killed_then_rerun_resumes(model, reference, cluster, tmp_path):
    source, out = write_input(tmp_path / "in.jsonl", good_rows()), tmp_path / "out.jsonl"
    proc = batch(*ray_args(source, out, model, cluster, 1), wait=False)
    kill_after_first_part(proc, out)
    proc.wait()
    time.sleep(2)  # the dead driver's actors may still commit what they hold: the rerun counts what is there then
    done = len({r["id"] for p in parts_of(out) for r in lines(p)})
    rerun = batch(*ray_args(source, out, model, cluster, 1))
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(re.search(r"(\d+) already done", rerun.stderr)[1])
    assert done > 0 and skipped >= done  # the committed rows are not redone
    assert same(out, reference)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
