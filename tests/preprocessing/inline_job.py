"""Whole preprocessing jobs in the test process: ``runner.run`` with its Ray replaced by an
in-process stand-in (``InlineRay``), and tiny LLaVA inputs (tests/preprocessing/
test_data_safety.py, test_hostile_records.py, test_kill_resume.py, test_plan_jobs.py,
test_source_registry.py)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from PIL import Image

from preprocessing import runner
from preprocessing.config import PreprocessConfig


class _Ref:
    def __init__(self, value):
        self.value = value


class InlineRay:
    """The part of the Ray API the driver uses, running each task in this process."""

    def remote(self, fn):
        class Task:
            def options(self, **_):
                return self

            def remote(self, *args):
                return _Ref(fn(*args))

        return Task()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.value

    def cluster_resources(self):
        return {"CPU": 1}


def jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def llava_inputs(root: Path, n: int = 3) -> tuple[Path, Path]:
    """``n`` one-image caption records: (the JSON file, the image root)."""
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for i in range(n):
        (images / f"{i}.jpg").write_bytes(jpeg((40 * i % 256, 100, 200)))
        entries.append({"id": f"r{i}", "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"Picture {i}."}]})
    data = root / "in.json"
    data.write_text(json.dumps(entries))
    return data, images


def llava_config(data, images, tokenizer, output, **kw) -> PreprocessConfig:
    fields = {"image_size": 28, "patch_size": 14, "samples_per_shard": 2, "max_seq_len": 64,
              "progress": False, **kw}
    return PreprocessConfig(source="llava", inputs=[str(data)], image_root=str(images),
                            tokenizer=str(tokenizer), output=str(output), **fields)


def run_inline(monkeypatch, cfg: PreprocessConfig):
    """``runner.run(cfg)`` with every task run in this process."""
    @contextlib.contextmanager
    def session(_cfg):
        yield InlineRay()

    monkeypatch.setattr(runner, "_ray_session", session)
    return runner.run(cfg)
