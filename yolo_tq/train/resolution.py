"""A final pass at the deployment size (`train.final_imgsz`, `train.final_epochs`; off by default).

A stage trained at a small image size (the retention budget's 320, a CPU shortcut) loses much of what the model reads
at the size it is deployed at (640): the early layers never see that resolution's detail. With `final_epochs: N` the
stage's last N epochs train at `final_imgsz`: at the start of the first of them the training loader is rebuilt
through the trainer's own `get_dataloader` (same augmentation, same number of batches), with mosaic closed if
Ultralytics' close_mosaic has closed it. Everything else (optimizer, lr schedule, EMA, checkpoints) carries on.
"""

from __future__ import annotations

from ultralytics.utils import LOCAL_RANK, LOGGER


def in_final_pass(epoch: int, epochs: int, final_epochs: int) -> bool:
    """Whether 0-based `epoch` of a run of `epochs` is one of its last `final_epochs`."""
    return final_epochs > 0 and epoch >= epochs - final_epochs


def train_loader_at(trainer, imgsz: int):
    """A training loader like the trainer's own (its augmentation, batch size, rank) at another image size."""
    size, trainer.args.imgsz = trainer.args.imgsz, imgsz
    try:
        batch = trainer.batch_size // max(trainer.world_size, 1)
        return trainer.get_dataloader(trainer.data["train"], batch_size=batch, rank=LOCAL_RANK, mode="train")
    finally:
        trainer.args.imgsz = size


def switch_to_final_imgsz(trainer) -> None:
    """Callback (on_train_epoch_start): in the final pass, train at its image size (rebuild the loader once; a run
    resumed inside the pass already has it from its saved args)."""
    plan = trainer.plan.final_pass
    if not in_final_pass(trainer.epoch, trainer.epochs, plan.epochs):
        return
    if trainer.train_loader.dataset.imgsz == plan.imgsz:
        return
    trainer.train_loader = train_loader_at(trainer, plan.imgsz)
    trainer.args.imgsz = plan.imgsz  # saved with the checkpoints: a resumed run builds its loader at this size
    if trainer.args.close_mosaic and in_final_pass(trainer.epoch, trainer.epochs, trainer.args.close_mosaic):
        trainer._close_dataloader_mosaic()
    LOGGER.info(f"final pass: epochs {trainer.epoch + 1}-{trainer.epochs} train at imgsz {plan.imgsz}")
