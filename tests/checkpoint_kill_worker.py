"""One process of tests/test_checkpoint_kill.py: a sparsified SFT run that checkpoints every step, keeps one
checkpoint, and SIGKILLs itself at a chosen moment of the step-3 save; or the run resuming it; or the uninterrupted
run. Usage: python -m tests.checkpoint_kill_worker MODEL_DIR OUTPUT_DIR {full|resume|KILL_POINT} WEIGHTS_OUT"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers.trainer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sparse_rl import SparseConfig, sparsify  # noqa: E402
from tests.trl_cases import build_trainer  # noqa: E402

KILL_STEP = 3
KILL_POINTS = ("before_optimizer", "before_rotation", "on_save")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillOnSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_STEP:
            _die()


def main(model_dir: str, output_dir: str, phase: str, weights_out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = build_trainer("sft", model_dir, output_dir, max_steps=4, save_strategy="steps", save_steps=1,
                            save_total_limit=1)
    sparsify(trainer, SparseConfig(discovery="random", density=0.2, seed=3))
    if phase == "before_optimizer":  # the weights and the mask are written, the optimizer state is not
        save_optimizer = trainer._save_optimizer_and_scheduler
        trainer._save_optimizer_and_scheduler = lambda folder: (
            _die() if trainer.state.global_step == KILL_STEP else save_optimizer(folder))
    elif phase == "before_rotation":  # the checkpoint is complete, the old one not yet deleted
        rotate = transformers.trainer.rotate_checkpoints
        transformers.trainer.rotate_checkpoints = lambda *a, **k: (
            _die() if trainer.state.global_step == KILL_STEP else rotate(*a, **k))
    elif phase == "on_save":  # after the rotation: only the new checkpoint is left
        trainer.add_callback(_KillOnSave())
    trainer.train(resume_from_checkpoint=True if phase == "resume" else None)
    save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}, weights_out)


if __name__ == "__main__":
    main(*sys.argv[1:])
