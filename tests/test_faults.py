"""The fault catalogue (issue "never lose a byte"): path mistakes, a damaged store, signals, two writers,
lying inputs, a full or read-only disk, torchrun. Each case asserts the exit code, a one-line error,
the source byte-identical, no destination or work folder left, and no worker alive."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import rank_files, run_cli

EXE = [sys.executable, "-m", "ckptctl"]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "src"
    assert run_cli("example", "gpt", "--layout", "tp2pp2", "--out", d).code == 0
    return d


@pytest.fixture(scope="module")
def store(src, tmp_path_factory) -> Path:
    st = tmp_path_factory.mktemp("store") / "st.zarr"
    r = run_cli("convert", src, st, "--nproc", "2")
    assert r.code == 0, r.err
    return st


@pytest.fixture
def work(tmp_path, src):
    """A private copy of the source in tmp_path (cases may point writes at it)."""
    s = tmp_path / "runs" / "src"
    shutil.copytree(src, s)
    return s


def _alive_workers(before: set[int]) -> list:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def check_refused(r, code: int, pattern: str, src: Path, src_digest: str, where: Path, dst: Path | None = None,
                  before: set[int] = frozenset()):
    """exit code, exactly one `error:` line matching `pattern`, source byte-identical, nothing left."""
    import re
    assert r.code == code, (r.code, r.err)
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.err
    assert re.search(pattern, errors[0]), errors[0]
    assert digest(src) == src_digest
    if dst is not None:
        assert not dst.exists() and not dst.is_symlink(), dst
    left = [p.name for p in where.iterdir() if ".ckptctl" in p.name or ".old-" in p.name]
    assert not left, left
    assert not _alive_workers(set(before))


# --- 1. path safety ----------------------------------------------------------------------------------

def test_destination_around_inside_or_equal_to_the_source(work):
    d = digest(work)
    runs = work.parent
    r = run_cli("convert", work, runs, "--to", "tp1pp1", "--overwrite")
    check_refused(r, 2, r"the destination .*runs contains the source", work, d, runs)
    assert "--overwrite" not in r.err.split("error:")[1].split("\n")[0].replace("pass --overwrite", "")
    r = run_cli("convert", work, work / "sub", "--to", "tp1pp1")
    check_refused(r, 2, r"lies inside the source", work, d, work, work / "sub")
    r = run_cli("convert", work, work, "--to", "tp1pp1", "--overwrite")
    assert r.code == 2 and digest(work) == d
    os.symlink(work, runs / "alias")                          # the same folder under another name
    r = run_cli("convert", work, runs / "alias" / "x", "--to", "tp1pp1")
    check_refused(r, 2, r"after resolving symlinks", work, d, runs)


def test_store_and_kept_store_never_replace_what_exists(work, tmp_path):
    d = digest(work)
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--store", work)
    check_refused(r, 2, r"--store .* is the source", work, d, tmp_path, tmp_path / "o")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--store", other)
    check_refused(r, 2, r"--store .*other exists and is not empty; pass --overwrite", work, d, tmp_path, tmp_path / "o")
    assert (other / "keep.txt").read_text() == "mine"
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--store", tmp_path / "o" / "st.zarr")
    check_refused(r, 2, r"--store .*st.zarr lies inside the destination .*one output would replace the other",
                  work, d, tmp_path, tmp_path / "o")
    (tmp_path / "o.zarr").mkdir()
    (tmp_path / "o.zarr" / "x").write_text("old store")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--keep-store")
    check_refused(r, 2, r"--keep-store's store .*o.zarr exists", work, d, tmp_path, tmp_path / "o")
    assert (tmp_path / "o.zarr" / "x").read_text() == "old store"


def test_existing_destination_and_empty_layout(work, tmp_path):
    d = digest(work)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"destination .*o exists and is not empty; pass --overwrite", work, d, tmp_path)
    r = run_cli("convert", work, tmp_path / "p", "--to", "")
    check_refused(r, 2, r"--to: empty layout", work, d, tmp_path, tmp_path / "p")


def test_overwrite_a_file_or_a_symlink_leaves_no_old_copy(work, tmp_path):
    (tmp_path / "f").write_text("a file")
    r = run_cli("convert", work, tmp_path / "f", "--to", "tp1pp1", "--overwrite", "--nproc", "0")
    assert r.code == 0, r.err
    assert len(rank_files(tmp_path / "f")) == 1
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    os.symlink(target, tmp_path / "l")
    r = run_cli("convert", work, tmp_path / "l", "--to", "tp1pp1", "--overwrite", "--nproc", "0")
    assert r.code == 0, r.err
    assert not (tmp_path / "l").is_symlink() and len(rank_files(tmp_path / "l")) == 1
    assert (target / "keep.txt").read_text() == "kept"                 # the symlink went, not what it named
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".ckptctl" in p.name]


def test_parent_is_a_file(work, tmp_path):
    d = digest(work)
    (tmp_path / "afile").write_text("x")
    r = run_cli("convert", work, tmp_path / "afile" / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"afile is a file, not a folder", work, d, tmp_path)


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root only); skipped where mounting is not allowed."""
    made = []

    def do(opts: str) -> Path:
        m = tmp_path / f"mnt{len(made)}"
        m.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(m)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); needs root")
        made.append(m)
        return m
    yield do
    for m in made:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_read_only_destination(work, tmp_path, mount):
    d = digest(work)
    ro = mount("ro,size=1m")
    r = run_cli("convert", work, ro / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"read-only filesystem", work, d, ro, ro / "o")


def test_disk_space_checked_before_the_first_byte_and_a_full_disk_named(work, tmp_path, mount, monkeypatch):
    d = digest(work)
    small = mount("size=3m")
    r = run_cli("convert", work, small / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"not enough free space .* writes .* \(\d+ bytes\) there, .* \(\d+ bytes\) are free",
                  work, d, small, small / "o")
    monkeypatch.setenv("CKPTCTL_SKIP_SPACE_CHECK", "1")        # as if the disk filled up during the run
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = run_cli("convert", work, small / "o", "--to", "tp1pp1", "--nproc", "2")
    check_refused(r, 2, r"No space left on device", work, d, small, small / "o", before)


# --- 2. a store that knows its own bytes --------------------------------------------------------------

def _chunk(store: Path) -> Path:
    return max((p for p in store.rglob("c/*") if p.is_file() and "model" in str(p)), key=lambda p: p.stat().st_size)


def test_store_flipped_byte_or_missing_chunk_is_refused(store, tmp_path, src):
    st = tmp_path / "st.zarr"
    shutil.copytree(store, st)
    d = digest(st)
    f = _chunk(st)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    d = digest(st)
    r = run_cli("convert", st, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2")
    check_refused(r, 2, r"array 'model/.*' chunk [\d.]+ fails its crc32c checksum", st, d, tmp_path, tmp_path / "o")
    r = run_cli("verify", st, src)
    assert r.code == 2 and "crc32c" in r.err
    f.unlink()
    d = digest(st)
    r = run_cli("convert", st, tmp_path / "o", "--to", "tp1pp1", "--nproc", "0")
    check_refused(r, 2, r"array 'model/.*' chunk [\d.]+ is missing", st, d, tmp_path, tmp_path / "o")


def test_verify_a_store_against_a_checkpoint(store, src):
    r = run_cli("verify", store, src, "--json")
    assert r.code == 0, r.err
    assert r.json()["tensors"] > 0 and not r.json()["differences"]
    assert not [p for p in store.parent.iterdir() if ".verify-" in p.name]


# --- 3. signals and workers ------------------------------------------------------------------------

def _start_stalled(src: Path, dst: Path):
    """`ckptctl convert` in a child process whose worker 1 stalls; returns (process, its worker pids)."""
    env = dict(os.environ, CKPTCTL_TEST_STALL_RANK="1")
    p = subprocess.Popen([*EXE, "convert", src, dst, "--to", "tp1pp1", "--nproc", "2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = psutil.Process(p.pid).children()
        if len(kids) == 2 and any(dst.parent.glob(f".{dst.name}.ckptctl-*/job.json")):
            return p, [k.pid for k in kids]
        time.sleep(0.05)
    p.kill()
    raise AssertionError("workers did not start")


def _gone(pids: list[int], within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_signal_during_start_up_says_nothing_was_written(work, tmp_path):
    """SIGTERM while the CLI still imports and inspects (its handler installed, no destination chosen yet):
    exit 143, one line saying nothing was written, no destination, no work folder."""
    d = digest(work)
    dst = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "ckptctl", "convert", str(work), str(dst), "--to", "tp1pp1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # SigCgt bit 15: the CLI's SIGTERM handler is in place
        with open(f"/proc/{p.pid}/status") as f:
            caught = int(next(ln for ln in f if ln.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted by SIGTERM; nothing written"), err
    assert digest(work) == d and not dst.exists()
    assert not [x for x in tmp_path.iterdir() if ".ckptctl" in x.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_every_worker_and_removes_the_work_folder(work, tmp_path, sig):
    d = digest(work)
    dst = tmp_path / "o"
    p, workers = _start_stalled(work, dst)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: interrupted by {signal.Signals(sig).name}; nothing written to {dst}"], err
    assert _gone(workers)
    assert digest(work) == d and not dst.exists()
    assert not [x for x in tmp_path.iterdir() if ".ckptctl" in x.name]


def test_sigkill_of_the_cli_kills_the_workers_and_the_next_run_cleans_up(work, tmp_path):
    dst = tmp_path / "o"
    p, workers = _start_stalled(work, dst)
    p.kill()
    p.communicate(timeout=30)
    assert _gone(workers), "workers outlived the CLI (no parent-death signal)"
    stale = list(tmp_path.glob(".o.ckptctl-*"))
    assert len(stale) == 1
    r = run_cli("convert", work, dst, "--to", "tp1pp1", "--nproc", "0", "--json")
    assert r.code == 0, r.err
    notes = r.json()["notes"]
    assert any(f"removed {stale[0].name}, the work folder of an earlier run" in n and n.endswith("B)")
               for n in notes), notes
    assert any("took over the lock of a run that died" in n and f"pid {p.pid}" in n for n in notes), notes
    assert not [x for x in tmp_path.iterdir() if ".ckptctl" in x.name]


# --- 4. one writer per destination ---------------------------------------------------------------

def test_second_writer_fails_at_once_naming_the_holder(work, tmp_path):
    from ckptctl.guard import DestLock
    d = digest(work)
    dst = tmp_path / "o"
    lock = DestLock(dst).acquire()
    try:
        t0 = time.monotonic()
        r = run_cli("convert", work, dst, "--to", "tp1pp1")
        assert time.monotonic() - t0 < 10
        assert r.code == 2 and f"pid {os.getpid()}" in r.err and "being written by another ckptctl" in r.err, r.err
        assert not dst.exists() and digest(work) == d
        assert len([ln for ln in r.err.splitlines() if ln.startswith("error:")]) == 1
    finally:
        lock.release()
    assert not list(tmp_path.glob(".o.ckptctl*"))


# --- 5. torchrun / srun ----------------------------------------------------------------------------

def test_under_torchrun_refused_at_once(work, tmp_path, monkeypatch):
    d = digest(work)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"started as one of 2 processes .*without torchrun/srun", work, d, tmp_path, tmp_path / "o")


def test_one_srun_task_per_node_of_a_multinode_job_is_allowed(monkeypatch):
    """examples/04_slurm_multinode.sbatch: srun --ntasks-per-node=1 with --nnodes equal to the task count."""
    from ckptctl.errors import BadInput
    from ckptctl.guard import refuse_under_launcher
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    refuse_under_launcher(nnodes=2)              # each task is one node of the job
    with pytest.raises(BadInput, match="one of 2 processes"):
        refuse_under_launcher(nnodes=1)          # two copies of a single-node job
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(BadInput, match="one of 4 processes"):
        refuse_under_launcher(nnodes=2)          # two tasks per node


def test_agent_store_variable_alone_does_not_hang(work, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2")
    assert r.code == 0, r.err


# --- 6. inputs that lie --------------------------------------------------------------------------

def test_torch_dist_relative_path_outside_the_checkpoint(tmp_path):
    import dataclasses
    td = tmp_path / "td"
    assert run_cli("example", "gpt", "--layout", "tp2pp1", "--format", "torch_dist", "--out", td).code == 0
    (md_path,) = list(td.rglob(".metadata"))
    for bad in ("../../x.distcp", "/etc/passwd"):
        md = pickle.loads(md_path.read_bytes())
        idx = next(iter(md.storage_data))
        md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], relative_path=bad)
        orig = md_path.read_bytes()
        md_path.write_bytes(pickle.dumps(md))
        d = digest(td)
        r = run_cli("convert", td, tmp_path / "o", "--to", "tp1pp1")
        check_refused(r, 2, rf"entry '{idx.fqn}' names file '{bad}', outside the checkpoint", td, d, tmp_path,
                      tmp_path / "o")
        assert run_cli("verify", td, td).code == 2
        md_path.write_bytes(orig)
    blob = sorted(md_path.parent.glob("*.distcp"))[0]             # a data file that is a symlink out
    shutil.move(blob, tmp_path / blob.name)
    os.symlink(tmp_path / blob.name, blob)
    d = digest(td)
    r = run_cli("convert", td, tmp_path / "o", "--to", "tp1pp1")
    check_refused(r, 2, rf"{blob.name} leads outside the checkpoint", td, d, tmp_path, tmp_path / "o")


def test_symlink_out_of_the_source_is_named_and_protected(work, tmp_path):
    rank = sorted(p.parent for p in rank_files(work))[0]
    outside = tmp_path / "outside"
    shutil.move(rank, outside)
    os.symlink(outside, rank)
    d = digest(outside)
    r = run_cli("convert", work, outside / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"lies inside the file read through the source's symlink", outside, d, outside, outside / "o")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--nproc", "0", "--json")
    assert r.code == 0, r.err
    assert any(f"through the symlink {rank}" in n for n in r.json()["notes"])


def test_divergent_replicas_refused_unless_allowed(work, tmp_path):
    f = next(p for p in rank_files(work) if p.parent.name == "mp_rank_01_000")   # TP rank 1's copy of stage 0's norms
    sd = torch.load(f, weights_only=False)
    key = next(k for k in sd["model"] if k.endswith("input_layernorm.weight"))
    sd["model"][key].view(torch.uint8).reshape(-1)[0] ^= 1
    torch.save(sd, f)
    d = digest(work)
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2")
    check_refused(r, 2, rf"replicated tensor '{key}' differs between mp_rank_00_000 and {f.parent.name}", work, d,
                  tmp_path, tmp_path / "o")
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2", "--allow-divergent-replicas",
                "--json")
    assert r.code == 0, r.err
    assert any("first rank file's copy was taken" in n for n in r.json()["notes"])


def test_verify_sees_a_step_or_lr_changed_on_one_rank(src, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(src, b)
    f = sorted(rank_files(b))[-1]
    sd = torch.load(f, weights_only=False)
    sd["optimizer"]["param_groups"][0]["lr"] *= 2
    torch.save(sd, f)
    r = run_cli("verify", src, b, "--json")
    assert r.code == 1
    (diff,) = [x for x in r.json()["differences"] if x["key"].startswith("optimizer.param_groups")]
    assert f.parent.name in diff["reason"] and "lr" in diff["key"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refused_pickle_names_the_class_not_torchs_advice(work, tmp_path):
    f = sorted(rank_files(work))[-1]
    sd = torch.load(f, weights_only=False)
    sd["evil"] = _Evil()
    torch.save(sd, f)
    d = digest(work)
    r = run_cli("convert", work, tmp_path / "o", "--to", "tp1pp1")
    check_refused(r, 2, r"refusing to unpickle posix\.system \(not on the allow-list\)", work, d, tmp_path, tmp_path / "o")
    assert "weights_only" not in r.err


# --- 8. resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref") / "o"
    assert run_cli("convert", src, d, "--to", "tp4pp1", "--nproc", "2").code == 0
    return d


@pytest.mark.parametrize("point,first,again", [("source:1", "2", "2"), ("target:1", "2", "2"), ("target:2", "2", "2"),
                                               ("source:1", "6", "6"), ("source:1", "6", "2")])
def test_resume_after_a_kill_is_byte_identical(src, reference, tmp_path, point, first, again):
    """The CLI is SIGKILLed after each worker finished its first (second) file of a phase; --resume keeps
    what was finished and the result equals an uninterrupted run, byte for byte. With 6 workers on 4 rank
    files the source files are split into parts (`source_units`); resumed with 2 workers, the parts'
    marks do not match the new split and those parts are redone."""
    from conftest import tree_bytes
    dst = tmp_path / "o"
    env = dict(os.environ, CKPTCTL_TEST_KILL_AFTER=point)
    p = subprocess.run([*EXE, "convert", src, dst, "--to", "tp4pp1", "--nproc", first], env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL and not dst.exists()
    (work,) = tmp_path.glob(".o.ckptctl-*")
    # The other worker may die inside its own mark's write: its `.NAME.partial-*` is not a mark (resume
    # reads only whole `NAME.json` files), so it is left out here and must not disturb the resumed run.
    marks = sorted(x.name for x in (work / "done").iterdir() if not x.name.startswith("."))
    assert marks and all(m.startswith(point.split(":")[0]) or m.startswith("source") for m in marks)
    r = run_cli("convert", src, dst, "--to", "tp4pp1", "--nproc", again, "--resume", "--json")
    assert r.code == 0, r.err
    assert any(f"--resume: reusing {work.name}" in n for n in r.json()["notes"]), r.json()["notes"]
    assert tree_bytes(dst) == tree_bytes(reference)
    assert not [x for x in tmp_path.iterdir() if ".ckptctl" in x.name]


def test_a_run_killed_inside_its_commit_loses_no_old_destination(work, tmp_path):
    """Killed between the commit's renames, only `.DST.old-*` holds the previous destination: the next
    run puts it back before anything else (and a signal during the renames waits for them)."""
    dst = tmp_path / "o"
    assert run_cli("convert", work, dst, "--to", "tp1pp1", "--nproc", "0").code == 0
    before = digest(dst)
    dst.rename(tmp_path / ".o.old-deadbeef")
    r = run_cli("convert", work, dst, "--to", "tp2pp1", "--nproc", "0", "--json")   # no --overwrite: refused
    assert r.code == 2 and digest(dst) == before
    from ckptctl import guard
    with pytest.raises(guard.Interrupted, match="after .* was written completely"):
        with guard.deferred():
            guard._caught.append(signal.SIGTERM)
    guard._caught.clear()
    guard._raised.clear()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_source_truncated_while_the_target_phase_maps_it(work, tmp_path, monkeypatch, nproc):
    """A source file emptied after a target worker mapped it (zero-copy reads): the worker dies of SIGBUS,
    and convert says which file changed (exit 2, one line), not "worker died" (exit 3); nothing at DST."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setenv("CKPTCTL_TEST_TRUNCATE_MAPPED", "1")
    dst = tmp_path / "o"
    r = run_cli("convert", work, dst, "--to", "tp1pp1", "--nproc", nproc)
    emptied = [str(p) for p in rank_files(work) if p.stat().st_size == 0]
    assert emptied and r.code == 2, (r.code, r.err)
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and any(p in errors[0] for p in emptied), r.err
    assert "truncated" in errors[0] or "changed" in errors[0], errors[0]
    assert not dst.exists() and not [x for x in tmp_path.iterdir() if ".ckptctl" in x.name]
    assert not _alive_workers(before)
