"""Data safety: nothing is deleted that the user did not name, never on a storage error; one run
per run folder; outputs replace only earlier outputs of ours; copies stay inside their target;
checkpoints load no code. Real S3 (SeaweedFS, behind a real HTTP proxy that injects faults), real
local folders, no Ray."""

import json
import os
import subprocess
import sys
import threading

import pyarrow.fs as pafs
import pytest
import torch

from faultproxy import FaultProxy
from lmflow_ray import lease as lease_mod
from lmflow_ray import storage
from lmflow_ray.config import load_recipe
from lmflow_ray.errors import StorageError, UserError
from lmflow_ray.lease import Lease
from lmflow_ray.storage import S3Options


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.05, 0.1))
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.05)


@pytest.fixture(scope="module")
def proxy(s3_server):
    p = FaultProxy(s3_server.endpoint).start()
    yield p
    p.stop()


def _checkpoint(uri, step, s3=None, files=None):
    """A complete checkpoint (manifest with sizes and hashes) written to ``uri``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in (files or {"hf/model.safetensors": b"w" * 100, "trainer_state.json": b"{}"}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
        storage.write_manifest(tmp, storage.list_local_files(tmp, hashes=True),
                               {"step": step, "world_size": 1, "zero_stage": 0, "method": "full"})
        storage.upload(tmp, uri, s3)


def _recipe(output, *more):
    return load_recipe(None, [f"output_model_path={output}", "num_workers=1", *more])


# ---- 1. a failed manifest read never deletes a checkpoint ---------------------------------------

def test_a_transient_manifest_error_is_retried_and_the_checkpoint_resumes(s3_server, proxy):
    from lmflow_ray.train.trainer import prepare

    s3 = S3Options(proxy.endpoint, s3_server.access_key, s3_server.secret_key)
    direct = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    run_uri = "s3://lmflow-safety/runs/flaky"
    _checkpoint(storage.join(run_uri, "checkpoint_000010"), 10, direct)
    proxy.fail("checkpoint_000010/manifest.json", times=2)  # two 403s, then the store answers again
    resume = prepare(_recipe("s3://lmflow-safety/runs"), run_uri, s3, 1, False, print)
    assert proxy.failed == 2
    assert resume is not None and resume.step == 10 and resume.complete


def test_a_manifest_that_cannot_be_read_stops_the_run_and_deletes_nothing(s3_server, proxy):
    from lmflow_ray.train.trainer import prepare

    s3 = S3Options(proxy.endpoint, s3_server.access_key, s3_server.secret_key)
    direct = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    run_uri = "s3://lmflow-safety/runs/denied"
    _checkpoint(storage.join(run_uri, "checkpoint_000010"), 10, direct)
    proxy.fail("checkpoint_000010/manifest.json", times=1000)
    with pytest.raises(StorageError, match="checkpoint_000010/manifest.json: storage kept failing.*without changing"):
        prepare(_recipe("s3://lmflow-safety/runs"), run_uri, s3, 1, False, print)
    with pytest.raises(StorageError):  # the worker's lookup fails the same way: no quiet fallback
        storage.latest_checkpoint(run_uri, s3)
    proxy.fail("", 0)
    assert [(c.step, c.complete) for c in storage.list_checkpoints(run_uri, direct)] == [(10, True)]


def test_a_listing_that_fails_is_an_error_not_an_empty_run(s3_server, proxy):
    s3 = S3Options(proxy.endpoint, s3_server.access_key, s3_server.secret_key)
    proxy.fail("/lmflow-safety", times=1000)  # the bucket listing
    try:
        with pytest.raises(StorageError, match="runs/denied"):
            storage.list_checkpoints("s3://lmflow-safety/runs/denied", s3)
    finally:
        proxy.fail("", 0)


def test_only_a_missing_manifest_makes_a_checkpoint_partial(tmp_path):
    from lmflow_ray.train.trainer import prepare

    run = tmp_path / "out" / "r"
    _checkpoint(str(run / "checkpoint_000002"), 2)
    (run / "checkpoint_000004" / "hf").mkdir(parents=True)  # cut off before its manifest
    said = []
    resume = prepare(_recipe(str(tmp_path / "out")), str(run), S3Options(), 1, False, said.append)
    assert resume.step == 2 and not (run / "checkpoint_000004").exists()
    assert any("checkpoint_000004" in line for line in said)


# ---- 2. run_name is one folder; deletions stay inside the run ---------------------------------

@pytest.mark.parametrize("name", [".", "..", "/", "../..", "a/b", "..x", "x.", " x", ""])
def test_a_run_name_that_is_not_one_folder_is_refused_at_load(name):
    with pytest.raises(UserError, match="storage.run_name: must be one folder name"):
        load_recipe(None, [f"run_name={name!r}" if name else "run_name=''"])


def test_fresh_deletes_only_inside_its_run_folder(tmp_path):
    from lmflow_ray.train.trainer import prepare

    out = tmp_path / "output_models"
    for run in ("keep-me", "redo"):
        _checkpoint(str(out / run / "checkpoint_000001"), 1)
    (tmp_path / "precious.txt").write_text("mine")
    prepare(_recipe(str(out)), str(out / "redo"), S3Options(), 1, True, print)
    assert (out / "keep-me" / "checkpoint_000001" / "manifest.json").exists()
    assert (out / "redo").is_dir() and not list((out / "redo").iterdir())
    assert (tmp_path / "precious.txt").exists()
    for bad in [str(out / "redo" / ".."), str(out), str(out / "keep-me"), str(tmp_path)]:
        with pytest.raises(StorageError, match="refusing to delete"):
            storage.remove_in_run(bad, str(out / "redo"))
    with pytest.raises(StorageError, match="refusing to delete"):
        storage.remove_in_run("s3://b/runs/x/../y", "s3://b/runs/x")


# ---- 3. outputs replace only outputs of ours, atomically ---------------------------------------

def _finished(tmp_parent, name="results.json", text="new"):
    folder = storage.new_output_dir(str(tmp_parent / "target"))
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)
    return folder


def test_an_output_never_replaces_a_folder_it_did_not_write(tmp_path):
    run = tmp_path / "output_models" / "runA"
    _checkpoint(str(run / "checkpoint_000002"), 2)
    for target in [run, tmp_path / "output_models", tmp_path]:
        finished = _finished(tmp_path)
        with pytest.raises(UserError, match="refusing to replace it"):
            storage.put_output(finished, str(target), "eval")
    assert (run / "checkpoint_000002" / "manifest.json").exists()
    model = tmp_path / "merged"
    storage.put_output(_finished(tmp_path, "config.json"), str(model), "model")
    with pytest.raises(UserError, match="already holds a model output"):  # an eval never lands on a model
        storage.check_output(str(model), "eval")


def test_an_output_replaces_its_earlier_self_in_one_step_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "eval" / "m-d"
    storage.put_output(_finished(tmp_path, text="first"), str(target), "eval")
    storage.put_output(_finished(tmp_path, text="second"), str(target), "eval")
    assert (target / "results.json").read_text() == "second"
    assert json.loads((target / storage.OUTPUT_MARK).read_text())["kind"] == "eval"
    assert sorted(os.listdir(target.parent)) == ["m-d"]  # no *-old, no temp folder


def test_a_killed_writer_leaves_the_old_output_and_its_temp_folder_is_swept(tmp_path):
    target = tmp_path / "merged"
    storage.put_output(_finished(tmp_path, "config.json", "old"), str(target), "model")
    code = ("import os, sys; from lmflow_ray import storage\n"
            f"d = storage.new_output_dir({str(target)!r}); open(os.path.join(d, 'config.json'), 'w').write('half')\n"
            "os._exit(9)  # killed before it could put the folder in place\n")
    subprocess.run([sys.executable, "-c", code], check=False)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".lmflow-ray-tmp-")]
    assert len(left) == 1 and (target / "config.json").read_text() == "old"
    elsewhere = tmp_path / ".lmflow-ray-tmp-999999@another-host-abc"  # a shared folder: not ours to judge
    elsewhere.mkdir()
    storage.put_output(_finished(tmp_path, "config.json", "new"), str(target), "model")  # sweeps the dead one
    assert (target / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == [elsewhere.name, "merged"]


def test_merge_refuses_a_run_folder_or_the_current_folder_before_any_work(tmp_path, tiny_model_dir):
    from lmflow_ray.model.adapters import merge_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    run = tmp_path / "output_models" / "smoke"
    _checkpoint(str(run / "checkpoint_000002"), 2)
    for target in [run, adapter, tmp_path]:
        with pytest.raises(UserError, match="refusing to replace it"):
            merge_adapter(adapter, target)
    assert (run / "checkpoint_000002" / "manifest.json").exists() and (adapter / "adapter_config.json").exists()


def test_remote_outputs_upload_before_deleting_and_refuse_other_prefixes(s3_server):
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    _checkpoint("s3://lmflow-safety/team/runs/r1/checkpoint_000001", 1, s3)
    with pytest.raises(UserError, match="refusing to replace it"):
        storage.check_output("s3://lmflow-safety/team/runs", "eval", s3)
    target = "s3://lmflow-safety/team/eval/m-d"
    import tempfile

    for names in (["results.json", "stale.txt"], ["results.json"]):
        with tempfile.TemporaryDirectory() as tmp:
            for n in names:
                with open(os.path.join(tmp, n), "w") as f:
                    f.write(n)
            storage.put_output(tmp, target, "eval", s3)
    fs, path = storage.filesystem(target, s3)
    listed = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))
    assert listed == sorted([".lmflow-ray-output.json", "results.json"])
    assert storage.list_checkpoints("s3://lmflow-safety/team/runs/r1", s3)[0].complete


@pytest.fixture
def full_s3(tmp_path):
    """A second SeaweedFS whose data folder is a small tmpfs, filled to its last 200 KB: the server
    answers a larger upload with S3's INTERNAL_FAILURE."""
    from s3server import SeaweedS3

    mount = tmp_path / "s3-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()[:200]})")
    server = SeaweedS3(mount / "weed").start()
    try:
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(b"0" * (free - 200_000))
        yield server
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_an_upload_the_server_refuses_is_an_error_not_a_finished_copy(full_s3, tmp_path):
    """pyarrow's copy_files only logs a failed S3 upload; a checkpoint copy must raise instead."""
    s3 = S3Options(full_s3.endpoint, full_s3.access_key, full_s3.secret_key)
    folder = tmp_path / "checkpoint"
    (folder / "hf").mkdir(parents=True)
    (folder / "hf" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (tmp_path / "note").mkdir()
    (tmp_path / "note" / "a.txt").write_text("small enough")
    storage.upload(tmp_path / "note", "s3://full/note", s3)  # the server works; it has no room for more
    assert storage.read_bytes("s3://full/note/a.txt", s3) == b"small enough"
    with pytest.raises(StorageError, match=r"hf/model\.safetensors: storage kept failing .*INTERNAL_FAILURE"):
        storage.upload(folder, "s3://full/run/checkpoint_000001", s3)
    fs, path = storage.filesystem("s3://full/run/checkpoint_000001/hf/model.safetensors", s3)
    assert fs.get_file_info(path).type == pafs.FileType.NotFound


# ---- 4. one run per run folder ----------------------------------------------------------------

def test_a_second_run_and_fresh_are_refused_while_a_lease_is_live(tmp_path):
    from lmflow_ray.train.trainer import run

    out = tmp_path / "out"
    run_uri = str(out / "busy")
    first = Lease(run_uri, None).acquire(print)
    try:
        _checkpoint(os.path.join(run_uri, "checkpoint_000001"), 1)
        with pytest.raises(UserError, match="another run is using this run folder"):
            Lease(run_uri, None).acquire(print)
        data = tmp_path / "data.json"  # a dataset that passes the preflight, so the lease is what refuses
        data.write_text(json.dumps({"type": "text_only", "instances": [{"text": "hello"}]}))
        with pytest.raises(UserError, match="another run is using this run folder"):
            run(_recipe(str(out), "run_name=busy", f"dataset_path={data}"), fresh=True)
        assert (out / "busy" / "checkpoint_000001" / "manifest.json").exists()
    finally:
        first.release()
    assert not (out / "busy" / lease_mod.LEASE).exists()
    Lease(run_uri, None).acquire(print).release()  # free again


def test_a_stale_lease_is_taken_over_with_a_message(tmp_path):
    run_uri = str(tmp_path / "crashed")
    gone = Lease(run_uri, None, ttl=0.01)
    gone.acquire(print)
    gone._stop.set()  # its driver died: nobody renews it
    said = []
    taker = Lease(run_uri, None).acquire(said.append)
    try:
        assert any("stopped renewing its lease" in line for line in said)
        assert taker._ours(taker.read())
    finally:
        taker.release()


def test_the_lease_of_a_killed_driver_on_this_machine_is_taken_at_once(tmp_path):
    run_uri = str(tmp_path / "killed")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = Lease(run_uri, None)
        held.owner = {**held.owner, "pid": child.pid}  # a lease written by that process, live for 120 s
        held._write()
        with pytest.raises(UserError, match="another run is using"):
            Lease(run_uri, None).acquire(print)  # its owner still runs: refused
    finally:
        child.kill()
        child.wait()
    said = []
    taker = Lease(run_uri, None).acquire(said.append)
    try:
        assert any("driver is gone" in line for line in said)
        assert taker._ours(taker.read())
    finally:
        taker.release()


def test_the_lease_is_renewed_while_the_run_goes_on(tmp_path):
    held = Lease(str(tmp_path / "long"), None, ttl=1.5, renew=0.1).acquire(print)
    try:
        first = held.read()["expires"]
        threading.Event().wait(2.0)  # longer than the TTL: only renewals (15 or so meanwhile) keep it live
        with pytest.raises(UserError, match="another run is using"):
            Lease(str(tmp_path / "long"), None).acquire(print)
        assert held.read()["expires"] > first
    finally:
        held.release()


# ---- 5. copies never write outside their target -----------------------------------------------

@pytest.mark.parametrize("rel", ["hf/../../../../x", "../x", "/etc/x", "a//b", "a/./b", ""])
def test_a_path_that_leaves_its_folder_is_refused(rel):
    with pytest.raises(StorageError, match="points outside its folder"):
        storage.safe_relpath(rel, "s3://b/ckpt")


def test_a_download_with_a_dotdot_key_writes_nothing(tmp_path):
    # SeaweedFS refuses such keys itself; pyarrow's in-memory filesystem holds one as a store might.
    memory = pafs._MockFileSystem()
    memory.create_dir("ckpt/hf/../../../..", recursive=True)
    for key in ("ckpt/hf/config.json", "ckpt/hf/../../../../escaped.txt"):
        with memory.open_output_stream(key) as f:
            f.write(b"x")
    target = tmp_path / "a" / "b" / "c" / "dl"
    with pytest.raises(StorageError, match="points outside its folder"):
        storage._copy_tree(memory, "ckpt", pafs.LocalFileSystem(), str(target), "mock://ckpt")
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()


# ---- checkpoints load no code; their content is checked ---------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LMFLOW_TEST_PWNED']}",))


def test_a_crafted_rng_file_runs_no_code_on_resume(tmp_path, monkeypatch):
    from lmflow_ray.train.worker import restore

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("LMFLOW_TEST_PWNED", str(pwned))
    folder = tmp_path / "ckpt"
    (folder / "rng").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 1, "log_history": []}))
    torch.save({"python": _Boom()}, folder / "rng" / "rank0.pt")

    class Loaded:  # the strategy's own state is not what this test is about
        def load(self, _):
            pass

    with pytest.raises(UserError, match="rng/rank0.pt: holds more than tensors and numbers"):
        restore(str(folder), Loaded(), 0)
    assert not pwned.exists()


def test_a_changed_checkpoint_file_is_refused_before_it_is_loaded(tmp_path):
    ckpt = tmp_path / "checkpoint_000003"
    _checkpoint(str(ckpt), 3, files={"deepspeed/mp_rank_00_model_states.pt": b"a" * 64, "hf/x": b"y"})
    manifest = json.loads((ckpt / storage.MANIFEST).read_text())
    storage.verify_local(str(ckpt), manifest, str(ckpt))
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"b" * 64)  # same size, other bytes
    with pytest.raises(StorageError, match="differs from the manifest's sha256"):
        storage.verify_local(str(ckpt), manifest, str(ckpt))
    assert storage.inspect_checkpoint(str(ckpt)).complete  # sizes still match: only content tells


def test_the_serve_cache_survives_two_replicas_fetching_at_once(s3_server, tmp_path, monkeypatch):
    from lmflow_ray.model import locate

    monkeypatch.setenv("LMFLOW_RAY_HOME", str(tmp_path / "home"))
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key).to_dict()
    _checkpoint("s3://lmflow-safety/models/m", 0, s3, files={"config.json": b"{}", "model.bin": b"z" * 4096})
    results, errors = [], []

    def replica():
        try:
            results.append(locate.local_folder("s3://lmflow-safety/models/m", s3))
        except Exception as err:  # noqa: BLE001 - the test reports it
            errors.append(err)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (open(os.path.join(results[0], "model.bin"), "rb").read()) == b"z" * 4096
    assert not [p for p in os.listdir(os.path.dirname(results[0])) if p.endswith(".part")]


def test_an_endpoint_without_a_scheme_is_refused(monkeypatch):
    with pytest.raises(UserError, match="storage.endpoint_url: '127.0.0.1:9000' has no scheme"):
        load_recipe(None, ["endpoint_url=127.0.0.1:9000"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.local:9000")
    with pytest.raises(UserError, match="AWS_ENDPOINT_URL: 'minio.local:9000' has no scheme"):
        S3Options.resolve()
