"""A tiny VQA benchmark from scikit-image's photos, and the tiny run it is evaluated on.

The benchmark is an lmms-eval task of the kind a user passes with ``--include-path``: a task
YAML, a ``utils.py`` and a local JSON-lines dataset (image path, question, ten annotator
answers with their ids, as VQAv2 stores them), scored by lmms-eval's own VQAv2 code
(``vqav2_process_results_val``: the standard VQA accuracy).

The run's data is tokenized by preprocessing's own template code with the real 32000-piece
Mistral tokenizer (``mistral`` template), so an export carries that tokenizer and template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

VOCAB = 32000
TASK = "vwlmm_photo_vqa"
QUESTION_SUFFIX = "\nAnswer the question using a single word or phrase."
# (skimage.data photo, question, the ten annotators' answers)
ITEMS = [
    ("astronaut", "Who is in the picture?",
     ["astronaut"] * 6 + ["an astronaut", "Astronaut.", "woman", "space person"]),
    ("chelsea", "What animal is this?", ["cat"] * 7 + ["a cat", "kitten", "tabby cat"]),
    ("coffee", "What drink is shown?", ["coffee"] * 8 + ["Coffee!", "espresso"]),
    ("rocket", "What is on the launch pad?", ["rocket"] * 5 + ["a rocket", "shuttle"] * 2
     + ["spaceship"]),
    ("camera", "How many people are there?", ["1"] * 5 + ["one"] * 3 + ["One", "2"]),
    ("coins", "What objects are these?", ["coins"] * 6 + ["money"] * 3 + ["the coins"]),
    ("hubble_deep_field", "What is in the sky?", ["galaxies"] * 5 + ["stars"] * 4 + ["space"]),
    ("moon", "What is this?", ["moon"] * 7 + ["the moon", "Moon", "crater"]),
    ("page", "What is on the page?", ["text"] * 6 + ["words"] * 2 + ["letters", "writing"]),
    ("brick", "What is the wall made of?", ["brick"] * 6 + ["bricks"] * 3 + ["stone"]),
    ("immunohistochemistry", "Is this a photo of tissue?", ["yes"] * 8 + ["no", "Yes"]),
    ("retina", "What part of the body is this?", ["eye"] * 5 + ["retina"] * 4 + ["an eye"]),
]

LOCAL_DATASET = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}"""
TASK_YAML = """task: {task}
{dataset}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''"""A local VQA task: images by path, scored as VQAv2 is."""

from PIL import Image

from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + {suffix!r}


def process_results(doc, results):
    return vqav2_process_results_val(doc, results)
'''


def photo(name: str, side: int = 64) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def write_images(folder: Path) -> Dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, _, _ in ITEMS:
        paths[name] = folder / f"{name}.png"
        photo(name).save(paths[name])
    return paths


def write_task(folder: Path, images: Dict[str, Path], answers: Sequence[List[str]],
               task: str = TASK) -> Path:
    """The task folder (for ``--include-path``): YAML, utils.py and the dataset, whose item
    ``i`` has the question of ``ITEMS[i]`` and the ten answers ``answers[i]``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as f:
        for i, ((name, question, _), ten) in enumerate(zip(ITEMS, answers)):
            assert len(ten) == 10
            f.write(json.dumps({
                "question_id": i, "image_path": str(images[name]), "question": question,
                "answer": ten[0],
                "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(ten)],
            }) + "\n")
    _write_yaml(folder, task, LOCAL_DATASET.format(data=folder / "data.jsonl"))
    return folder


def write_hub_task(folder: Path, task: str, dataset_id: str) -> Path:
    """The task on a dataset of the Hugging Face hub (``dataset_path: <id>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_yaml(folder, task, f"dataset_path: {dataset_id}")
    return folder


def _write_yaml(folder: Path, task: str, dataset: str) -> None:
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, dataset=dataset))
    (folder / "utils.py").write_text(TASK_UTILS.replace("{suffix!r}", repr(QUESTION_SUFFIX)))


def read_dataset(folder: Path) -> List[dict]:
    return [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]


def write_run_data(root: Path, tokenizer: Path) -> Path:
    """Question-answer samples of the photos (32 px, the tiny preset's images) in the
    ``mistral`` template, with the tokenizer folder in the manifest."""
    import io

    from pipeline.data.synthetic import write_dataset
    from preprocessing.legacy_tokenizer import load_text_tokenizer
    from preprocessing.templates import Turn, tokenize

    text = load_text_tokenizer(str(tokenizer), "auto")
    samples = []
    for i, (name, question, answers) in enumerate(ITEMS):
        buf = io.BytesIO()
        photo(name).resize((32, 32)).save(buf, format="JPEG", quality=95)
        tok = tokenize("mistral", [Turn("human", "<image>\n" + question),
                                   Turn("gpt", answers[0])], text)
        samples.append(dict(key=f"photo-{i:05d}", source_id=str(i), images=[buf.getvalue()],
                            input_ids=np.asarray(tok.input_ids, np.int32),
                            labels=np.asarray(tok.labels, np.int32), num_images=1,
                            template="mistral", meta=json.dumps({"photo": name})))
    write_dataset(str(root), samples, shard_size=len(samples), formats=("arrow",),
                  tokenizer=str(tokenizer), template="mistral", max_seq_len=64,
                  vocab_size=VOCAB)
    return root
