"""Private Ray clusters start on a machine with nothing in ``HOME``: each gets its own token
(mode 0600, in the cluster's temp folder, never in a log), clients authenticate with it, and
nothing is read from or written to ``~/.ray``."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from preprocessing.local_ray import LocalRayHead, ray_env
from tests.preprocessing.pp_checks import llava_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _fresh_user_env(home: Path) -> dict:
    """A new user's environment: an empty HOME and no Ray/AWS/HF variables inherited (the two
    that ``ray_env`` sets for every loopback cluster excepted)."""
    home.mkdir()
    ours = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in ray_env(pythonpath=str(REPO)).items()
           if k in ours or not k.startswith(("RAY_", "AWS_", "HF_", "XDG_"))}
    env["HOME"] = str(home)
    return env


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
    env = _fresh_user_env(home)
    assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN_PATH" not in env
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
    """`vwlmm-preprocess` with no --ray-address / RAY_ADDRESS on a machine with an empty HOME."""
    home = tmp_path / "home"
    env = _fresh_user_env(home)
    out = tmp_path / "out"
    inputs = [str(p) for p in demo.llava_json][:1]
    cmd = [sys.executable, "-m", "preprocessing.cli",
           *llava_args(demo, tokenizer_dir, "vicuna_v1", out, inputs=inputs), "--num-workers", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert (out / "manifest.json").exists()
    assert not (home / ".ray").exists()


def test_worker_port_range_avoids_the_ports_of_other_components():
    """Ray refuses a head whose worker port range holds a port given to another component."""
    from preprocessing.local_ray import free_port_range

    taken = set(range(20000, 30000))
    for _ in range(20):
        base = free_port_range(64, avoid=taken)
        assert not taken.intersection(range(base, base + 64))
