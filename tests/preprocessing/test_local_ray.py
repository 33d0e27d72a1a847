"""Private Ray clusters start on a machine with nothing in ``HOME``: each gets its own token
(mode 0600, in the cluster's temp folder, never in a log), clients authenticate with it, and
nothing is read from or written to ``~/.ray``."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from preprocessing.local_ray import LocalRayHead, free_port
from tests.fresh_env import BIN, fresh_user_env


def _files_holding(root: Path, needle: bytes, skip: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != skip:
            try:
                if needle in path.read_bytes():
                    found.append(str(path.relative_to(root)))
            except OSError:  # sockets, files removed while walking
                continue
    return found


def test_head_with_empty_home_runs_a_job_and_keeps_its_token_private(tmp_path):
    home = tmp_path / "home"
    env = fresh_user_env(home)
    with LocalRayHead(env, start_timeout=90) as head:
        token_path = Path(head.token_path)
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(head.temp).stat().st_mode) == 0o700
        token = token_path.read_bytes()
        assert len(token) == 64

        workdir = tmp_path / "job"
        workdir.mkdir()
        probe = ("import ray; ray.init(); "
                 "print('cpus', ray.get(ray.remote(lambda: ray.cluster_resources()['CPU'])"
                 ".remote()))")
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
               "--working-dir", str(workdir), "--", sys.executable, "-c", probe]
        res = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0 and "succeeded" in res.stdout, res.stdout[-3000:] + \
            res.stderr[-3000:]
        assert "cpus 2.0" in res.stdout

        # A client without the token is refused.
        anonymous = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        res = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.dashboard],
                             env=anonymous, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0

        leaks = _files_holding(Path(head.temp), token, skip=token_path)
        assert leaks == [], f"the token appears in {leaks}"
        assert token not in res.stdout.encode() + res.stderr.encode()
    assert not Path(head.temp).exists()
    assert not (home / ".ray").exists()


def test_preprocess_without_a_cluster_starts_a_private_ray(tmp_path, demo, tokenizer_dir):
    """The installed `vwlmm-preprocess`, with no --ray-address, in a new user's shell, on a
    machine where another Ray cluster is registered (Ray's ``ray_current_cluster`` file, which
    a bare ``ray.init()`` joins): it starts a Ray of its own and leaves ``HOME`` empty."""
    home = tmp_path / "home"
    user_tmp = tmp_path / "user-tmp"
    (user_tmp / "ray").mkdir(parents=True)
    (user_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = fresh_user_env(home, TMPDIR=str(user_tmp))
    tar, parquet = (next(p for p in demo.laion_inputs if p.endswith(f"00000.{ext}"))
                    for ext in ("tar", "parquet"))
    cmd = [str(BIN / "vwlmm-preprocess"), "--source", "laion", "--input", tar, parquet,
           "--tokenizer", tokenizer_dir, "--template", "plain", "--output", "out",
           "--format", "arrow", "--image-size", "32", "--patch-size", "8", "--max-seq-len", "64",
           "--num-workers", "1", "--no-progress"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert (tmp_path / "out" / "manifest.json").exists()
    assert list(home.iterdir()) == []


def test_worker_port_range_avoids_the_ports_of_other_components():
    """Ray refuses a head whose worker port range holds a port given to another component."""
    from preprocessing.local_ray import free_port_range

    taken = set(range(20000, 30000))
    for _ in range(20):
        base = free_port_range(64, avoid=taken)
        assert not taken.intersection(range(base, base + 64))


def test_a_killed_job_leaves_no_private_ray_behind(tmp_path):
    """The private Ray of a `vwlmm-preprocess` killed with SIGKILL (no cleanup code runs) stops
    with it: the head and every Ray process below it exit."""
    import psutil

    code = ("import os, signal, psutil\n"
            "from preprocessing.local_ray import private_local_ray\n"
            "with private_local_ray(num_cpus=1) as head:\n"
            "    ray_procs = [head.proc.pid] + [p.pid for p in "
            "psutil.Process(head.proc.pid).children(recursive=True)]\n"
            "    print(*ray_procs, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code], env=fresh_user_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == -9, res.stderr[-3000:]
    pids = [int(pid) for pid in res.stdout.split()]
    assert len(pids) >= 3  # ray start, gcs_server, raylet at least
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=90)
    assert alive == [], [p.cmdline()[:3] for p in alive]
