"""Publishing into the model repository: a set of models as one unit, writers in turn, ensembles pinned to their own
members (issue 24, items 1-3). Real processes, SIGKILL, concurrent writers, and the real Triton serving the result."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from export.graph import reference_logits
from serve.repository import (JOURNAL, ServingOptions, StagedModel, TensorSpec, finish_publish, model_config,
                              naive_ensemble_models, publish_models, read_config, staging)
from serve.server import TritonServer
from tests.helpers import REPO, export_cli, make_checkpoint
from train.checkpoint import load_model

IMAGE = TensorSpec("image", "UINT8", [8, 8, 3], "NHWC")
LOGITS = TensorSpec("logits", "FP32", [4], labels=True)
LABELS = ["a", "b", "c", "d"]

# `python -m <module> <args>` whose process SIGKILLs itself just before its Nth rename into the repository (the
# journal's, then each model's): a kill injected at a chosen step of the publish.
KILL_AT_RENAME = """
import os, runpy, signal, sys
from pathlib import Path
repo, kill_at = Path(sys.argv[1]).absolute(), int(sys.argv[2])
rename, count = os.rename, [0]
def rename_or_die(src, dst):
    if Path(dst).parent == repo:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)
os.rename = rename_or_die
sys.argv = sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def ensemble_set(work: Path, max_batch: int) -> list[StagedModel]:
    """Two members, the mean step and the ensemble naming them, all with `max_batch` (the issue's self-reference)."""
    opts = ServingOptions(max_batch_size=max_batch)
    members = []
    for k in range(2):
        (work / f"m{k}.onnx").write_text(f"member {k} for max batch {max_batch}")
        members.append(StagedModel(model_config(f"m{k}", "onnxruntime_onnx", [IMAGE], [LOGITS], opts),
                                   {"model.onnx": work / f"m{k}.onnx"}, LABELS))
    return members + naive_ensemble_models("e", ["m0", "m1"], IMAGE, LOGITS, LABELS, opts, work)


def publish_ensemble(repo: Path, max_batch: int) -> None:
    with staging(repo) as work:
        publish_models(repo, ensemble_set(work, max_batch))


def snapshot(repo: Path) -> dict[str, bytes | None]:
    """Every path under the repository with its bytes (None for a folder)."""
    return {str(p.relative_to(repo)): None if p.is_dir() else p.read_bytes() for p in sorted(repo.rglob("*"))}


def publish_in_child(repo: Path, kill_at: int | None) -> int:
    """Publish the max-batch-32 set in a forked process that SIGKILLs itself before its `kill_at`th rename (any
    rename: staging moves, the journal, the swaps); its exit status, or the renames it made when not killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            rename, count = os.rename, [0]

            def rename_or_die(src, dst):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return rename(src, dst)
            os.rename = rename_or_die
            publish_ensemble(repo, 32)
            os._exit(min(count[0], 254))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(255)
    return os.waitpid(pid, 0)[1]


def test_a_publish_killed_at_any_step_leaves_the_old_set_or_the_whole_new_one(tmp_path):
    original = tmp_path / "original" / "repo"
    publish_ensemble(original, 64)
    before = snapshot(original)
    complete = tmp_path / "complete" / "repo"
    shutil.copytree(original, complete)
    status = publish_in_child(complete, None)
    assert os.WIFEXITED(status) and 0 < os.WEXITSTATUS(status) < 255
    after, steps = snapshot(complete), os.WEXITSTATUS(status)
    assert read_config(complete / "e").max_batch_size == 32 and after != before
    assert [s.model_version for s in read_config(complete / "e").ensemble_scheduling.step] == [2, 2, 2]
    outcomes = []
    for step in range(1, steps + 1):
        repo = tmp_path / str(step) / "repo"
        shutil.copytree(original, repo)
        status = publish_in_child(repo, step)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, step
        if not (repo / JOURNAL).exists():  # killed before the commit point, or after the last step of the publish
            assert snapshot(repo) in (before, after), step
        finish_publish(repo)  # what serve (or the next writer) does first
        assert snapshot(repo) in (before, after), step
        outcomes.append(snapshot(repo) == after)
        with staging(repo):  # the next writer removes the killed one's staging folder
            pass
        assert [p.name for p in repo.parent.iterdir()] == ["repo"], step
    assert outcomes == sorted(outcomes) and outcomes[0] is False and outcomes[-1] is True  # old set, then the new


WRITER = """
import sys
from pathlib import Path
from serve.repository import ServingOptions, TensorSpec, model_config, staging, write_model
repo, tag = Path(sys.argv[1]), sys.argv[2]
cfg = model_config("m", "onnxruntime_onnx", [TensorSpec("image", "UINT8", [4])], [TensorSpec("logits", "FP32", [2])],
                   ServingOptions())
for i in range(100):
    with staging(repo) as work:
        (work / "model.onnx").write_text(f"{tag} {i}")
        print(write_model(repo, cfg, {"model.onnx": work / "model.onnx"})[1], flush=True)
"""


def test_concurrent_writers_of_one_model_take_turns_and_never_share_a_version(tmp_path):
    repo = tmp_path / "repo"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(repo), tag], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in ("a", "b")]
    results = [w.communicate(timeout=300) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err for _, err in results]
    reported = {tag: [int(v) for v in out.split()] for tag, (out, _) in zip("ab", results)}
    assert sorted(reported["a"] + reported["b"]) == list(range(1, 201))  # 200 writes, 200 distinct versions
    for tag, versions in reported.items():
        assert [(repo / "m" / str(v) / "model.onnx").read_text() for v in versions] == [f"{tag} {i}" for i in range(100)]
    assert not list(tmp_path.glob(".repo-staging-*"))


def naive_export(ckpt: Path, repo: Path, name: str, *extra: str) -> list[str]:
    return ["export.onnx", "--ckpt", str(ckpt), "--out", str(repo), "--name", name, "--naive-ensemble",
            "--experts", "0,1", *extra]


@pytest.fixture(scope="module")
def two_checkpoints_side_by_side(tmp_path_factory):
    """Two NCL checkpoints exported into one repository (max batch 16; the second twice), then the first re-exported
    with --overwrite --max-batch 8 and SIGKILLed mid-publish (one model renamed in, the others not); served by the
    real Triton."""
    tmp = tmp_path_factory.mktemp("side-by-side")
    a = make_checkpoint(tmp / "a.pt")
    payload = torch.load(a, weights_only=True)
    for key, value in payload["state_dict"].items():
        if ".head." in key:
            value.mul_(-1)  # another checkpoint of the same method and shapes: the opposite predictions
    torch.save(payload, tmp / "b.pt")
    repo = tmp / "repo"
    export_cli(*naive_export(a, repo, "tiny", "--max-batch", "16")[1:])
    for _ in range(2):  # a re-export adds version 2 of every model of the set
        export_cli(*naive_export(tmp / "b.pt", repo, "other", "--max-batch", "16")[1:])
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(repo), "3",
                             *naive_export(a, repo, "tiny", "--max-batch", "8", "--overwrite")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (repo / JOURNAL).exists() and read_config(repo / "tiny_expert0").max_batch_size == 8
    assert read_config(repo / "tiny_naive").max_batch_size == 16  # the mixed set Triton refuses, until rolled forward
    with TritonServer(repo, "bundled", ready_timeout=120) as server:
        yield {"tiny": a, "other": tmp / "b.pt"}, repo, server


def test_each_ensemble_serves_its_own_checkpoint(two_checkpoints_side_by_side):
    checkpoints, repo, server = two_checkpoints_side_by_side
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        for (name, ckpt), version in zip(checkpoints.items(), (1, 2)):
            steps = read_config(repo / f"{name}_naive").ensemble_scheduling.step
            assert [(s.model_name, s.model_version) for s in steps] == [
                (f"{name}_expert0", version), (f"{name}_expert1", version), (f"{name}_naive_mean", version)]
            request = httpclient.InferInput("image", list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            served = client.infer(f"{name}_naive", [request]).as_numpy("logits")
            model, _ = load_model(ckpt)
            expected = reference_logits(model, (0, 1), torch.from_numpy(images), "uint8-nhwc").numpy()
            assert np.abs(served - expected).max() < 1e-4, name
    finally:
        client.close()


def test_an_export_killed_mid_publish_is_served_whole(two_checkpoints_side_by_side):
    _, repo, server = two_checkpoints_side_by_side
    assert not (repo / JOURNAL).exists()
    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        ready = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
        assert {"tiny_naive", "tiny_expert0", "tiny_expert1", "other_naive"} <= ready
        assert {m: client.get_model_config(m)["max_batch_size"] for m in ("tiny_naive", "tiny_expert1", "other_naive")} \
            == {"tiny_naive": 8, "tiny_expert1": 8, "other_naive": 16}
    finally:
        client.close()
