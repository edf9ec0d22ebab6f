"""lm-evaluation-harness, unmodified from PyPI, scores the embedded model through our server:
its `local-completions` model sends token ids with `echo`, `logprobs` and `max_tokens` 1 for
log-likelihoods and plain completions with stop strings for `generate_until`. Two small tasks are
defined here with data written by the test; nothing is downloaded. The log-likelihoods it
reports equal those computed from `Model.logits` on the same tokens (fp32, within 1e-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402

MC = [
    {"question": "In the beginning God created the", "choices": [" heaven", " sea", " king"], "answer": 0},
    {"question": "And God said, Let there be", "choices": [" light", " bread"], "answer": 0},
    {"question": "The LORD is my", "choices": [" shepherd", " river", " gate"], "answer": 0},
]
GEN = [
    {"question": "And God said, Let there be light: and there was", "answer": " light"},
    {"question": "In the beginning God created the heaven and the", "answer": " earth"},
]
TASKS = """\
task: g3n_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
---
task: g3n_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: [":", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
RUN = """\
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
base_url, tokenizer, tasks_dir, out = sys.argv[1:]
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args={"base_url": base_url, "model": "gemma3n-tiny", "tokenizer": tokenizer,
                "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
    tasks=["g3n_mc", "g3n_gen"],
    task_manager=TaskManager(include_path=tasks_dir),
    log_samples=True,
)
samples = {t: [{"arguments": s["arguments"], "resps": s["resps"]} for s in v] for t, v in results["samples"].items()}
json.dump({"results": results["results"], "samples": samples}, open(out, "w"), default=str)
"""


def _offline_env(home: Path) -> dict[str, str]:
    """What keeps the harness, datasets and the hub client from reaching any network."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(home),  # dataset caches in the test's folder
        "TOKENIZERS_PARALLELISM": "false",
    }


def _write_tasks(folder: Path) -> None:
    for name, rows in (("mc", MC), ("gen", GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, text in enumerate(TASKS.format(mc=folder / "mc.jsonl", gen=folder / "gen.jsonl").split("---\n")):
        (folder / f"task{i}.yaml").write_text(text)


def test_lm_eval_scores_through_the_server(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    model = gemma3n.load()
    _write_tasks(tmp_path)
    out = tmp_path / "out.json"
    with BackgroundServer(create_app(model)) as srv:
        proc = subprocess.run(
            [sys.executable, "-c", RUN, f"{srv.base_url}/completions", str(tiny_model_dir), str(tmp_path), str(out)],
            env=_offline_env(tmp_path / "hf"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-3000:], 3000)
    got = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scored = got["samples"]["g3n_mc"]
    assert len(scored) == len(MC) and sum(len(s["arguments"]) for s in scored) == sum(len(d["choices"]) for d in MC)
    for sample in scored:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            # the harness's encoding: context + continuation as one text, no special tokens
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
            logp = torch.log_softmax(model.logits(torch.tensor([whole]))[0], dim=-1)
            expected = sum(float(logp[i - 1, whole[i]]) for i in range(n_context, len(whole)))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3)
    assert 0.0 <= got["results"]["g3n_mc"]["acc,none"] <= 1.0
    generated = got["samples"]["g3n_gen"]
    assert len(generated) == len(GEN) and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "exact_match,none" in got["results"]["g3n_gen"]
