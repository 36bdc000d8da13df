"""A worker's raw output lines keep their own level when relayed; Dagster echoes are dropped."""

from __future__ import annotations

import logging

from resources.compute.worker_lines import WorkerLines

LINES = [
    (
        "2026-12-07 08:37:49 +0000 - dagster - INFO - __ASSET_JOB - c09f1d37 - adapter - "
        "lora_sft step 1/4 loss 4.6833",
        None,
    ),
    ("plain print from the step", logging.INFO),
    ("WARNING:transformers.modeling_utils:weights not initialised", logging.WARNING),
    ("ERROR:root:something broke", logging.ERROR),
    (
        "/x/modeling_utils.py:3303: FutureWarning: `is_gradient_checkpointing` is deprecated",
        logging.WARNING,
    ),
    ("Loading weights: 100%|██████████| 21/21 [00:00<00:00, 33669.87it/s]", logging.DEBUG),
    ("Traceback (most recent call last):", logging.ERROR),
    ('  File "/x/step.py", line 3, in <module>', logging.ERROR),
    ("    raise ValueError('bad')", logging.ERROR),
    ("ValueError: bad", logging.ERROR),
    ("after the traceback", logging.INFO),
    (
        "2026-12-07 08:37:50 +0000 - dagster - DEBUG - __ASSET_JOB - c09f1d37 - 8135 - adapter - "
        "STEP_SUCCESS - Finished execution",
        None,
    ),
]


def test_each_line_keeps_its_level_and_echoes_are_dropped():
    lines = WorkerLines()
    assert [(line, lines.level(line)) for line, _ in LINES] == LINES
