"""Plain ML code for the task-geometry experiment: no Dagster here.

Everything in this package is importable and testable on its own: task data
generators, the tiny base model, adapter training, spectral math and the
classifiers. The Dagster assets in ``lab_assets`` call into it.
"""

# The modules a LoRA adapts by default on a Llama-architecture model: attention and MLP.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
