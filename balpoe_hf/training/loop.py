"""The BalPoE training loop with Accelerate: ``train(recipe, output_dir)``, read top to bottom.

    from balpoe_hf.recipes import load_recipe
    from balpoe_hf.training import train

    result = train(load_recipe("fashion-mnist-lt-quick", epochs=1), "runs/quick")
    print(result.eval_report["balanced_accuracy"])

It runs in every process that ``accelerate launch`` starts (``balpoe-train``, ``python -m balpoe_hf.train``
and ``scripts/train.py`` are command lines over it), or in a plain Python process. The output directory gets
the model (``save_pretrained``, loadable with ``AutoModelForImageClassification``) with its image processor,
``recipe.yaml``, ``train_results.json``, ``eval_results.json`` (the balanced test set) and one checkpoint per
epoch (the last few are kept) for ``resume=True``. With ``recipe.holdout_fraction > 0`` the held-out split is
evaluated after the last epoch: its calibration goes into the model's ``config.calibration`` and its
``long_tail_report`` into ``holdout_results.json``.

``train`` runs four phases, each a function of its own: ``set_up`` (checks, accelerator, data, model,
optimizer, loaders, output directory, resume; a ``Run`` and the ``TrainState`` to go on from),
``train_one_epoch`` (with its step checkpoints and logging, each expert's loss included),
``evaluate_and_calibrate`` (the test set; after the last epoch the held-out calibration first) and
``save_outputs``; an epoch checkpoint follows each epoch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.data import Mixup
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import run_folder
from ..data.loaders import build_loaders
from ..data.loading import TrainingData, input_paths, load_training_data
from ..data.splits import labels_array, shot_groups
from ..data.transforms import build_processor, evaluation_split
from ..errors import HubFolderError, HubPublishError, TrainingError, TrainingFailure
from ..evaluation.calibrate import calibrate_and_save
from ..evaluation.evaluate import absent_classes
from ..evaluation.printing import absent_classes_warning, format_balanced
from ..metrics import percent
from ..models.balpoe.label_shift import describe_auto
from ..recipes import Recipe
from . import checkpoints, non_finite, speed
from .eval_loop import calibrate_on_holdout, evaluate
from .model import build_model, check_model, lr_lambda, optimizer_steps_done, parameter_groups
from .resume import (
    check_output_dir,
    check_output_flags,
    clear_run_outputs,
    continue_schedule,
    epoch_batches,
    load_checkpoint,
    model_signature,
    start_run,
)
from .state import Run, TrainOutput, TrainState
from .sync_batchnorm import convert_sync_batchnorm

# numpy seeds its global generator with 0 <= seed < 2**32 and accelerate's set_seed(device_specific=True) adds
# the process index: an epoch's seed wraps below 2**32, with room for 2**16 processes.
EPOCH_SEED_MODULUS = 2**32 - 2**16


def epoch_global_seed(seed: int, epoch: int) -> int:
    """The seed of the global generators (``set_seed``) at the start of epoch ``epoch``: ``seed + epoch``,
    wrapped below ``EPOCH_SEED_MODULUS`` (the same value for every seed a run could use before)."""
    return (seed + epoch) % EPOCH_SEED_MODULUS


def expected_world_size() -> int | None:
    """How many processes the launcher meant to start, where it says so.

    ``torchrun`` (and ``accelerate launch --multi_gpu``) export ``WORLD_SIZE``. accelerate's single-process
    launcher exports ``MASTER_ADDR`` only when it was asked for more than one process (as with
    ``accelerate launch --cpu --num_processes 2``, which still starts a single process); it then
    returns 2, meaning "more than one".
    """
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and os.environ.get("MASTER_ADDR") and not os.environ.get("RANK"):
        return 2
    return None


def check_world_size(num_processes: int) -> None:
    """Stop when the launcher asked for more processes than the Accelerator runs."""
    expected = expected_world_size()
    if expected is None or num_processes >= expected:
        return
    asked = f"{expected} processes" if os.environ.get("WORLD_SIZE") else "more than one process"
    raise TrainingError(
        f"the launcher asked for {asked} but this run sees {num_processes}: the processes would each train "
        "on their own instead of together. `accelerate launch --cpu --num_processes N` starts ONE process; "
        "for N CPU processes use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
        "scripts/train.py ...`, on N GPUs `accelerate launch --multi_gpu --num_processes N ...`, and for "
        "one process leave out --num_processes."
    )


def past_deadline(accelerator: Accelerator, deadline: float | None, epoch_seconds: float) -> bool:
    """Whether another epoch of ``epoch_seconds`` would end after ``deadline`` (``time.time()``).

    Every process must stop at the same epoch, so the most pessimistic process decides.
    """
    if deadline is None:
        return False
    late = torch.tensor(float(time.time() + epoch_seconds > deadline), device=accelerator.device)
    return bool(accelerator.reduce(late, reduction="sum").item() > 0)


def _check_tracker(report_to: str) -> None:
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("--report-to tensorboard needs the tensorboard package: pip install "
                            "'balpoe-hf[train]' (or pip install tensorboard).")


def _check_hub_upload_possible(push_to_hub: bool, hub_model_id: str | None) -> None:
    if not push_to_hub:
        return
    if not hub_model_id:
        raise TrainingError("--push-to-hub needs --hub-model-id USER/NAME.")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise TrainingError("--push-to-hub needs the network, but offline mode is on (HF_HUB_OFFLINE=1); "
                            "unset it, or publish later with balpoe-push (scripts/push_to_hub.py).")


def _accelerator(recipe: Recipe, output_dir: Path, report_to: str) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned memory on GPUs
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate keeps fp16's autocast and loss scaling to GPUs and trains in fp32 on a CPU, while still
        # reporting fp16: a run would claim a precision it did not train in.
        raise TrainingError("mixed precision fp16 needs a GPU: on the CPU accelerate trains in fp32. Use "
                            "--mixed-precision bf16 (fast on CPUs with AVX-512 BF16 or AMX) or no, and no "
                            "--mixed_precision fp16 to accelerate launch.")
    check_world_size(accelerator.num_processes)
    return accelerator


def _describe_data(recipe: Recipe, data: TrainingData, groups: dict[str, list[int]]) -> str:
    counts = data.class_counts
    return (f"{recipe.name}: {len(data.train):,} training images in {len(counts)} classes "
            f"({data.class_count_source}; {max(counts)} down to {min(counts)} per class), "
            f"{len(data.test):,} test images; many/medium/few-shot classes "
            f"{len(groups['many'])}/{len(groups['medium'])}/{len(groups['few'])}"
            + ("" if data.holdout is None else f"; {len(data.holdout):,} held out for calibration "
               f"({max(data.holdout_counts)} down to {min(data.holdout_counts)} per class)"))


def set_up(recipe: Recipe, output_dir: Path, *, resume: bool, overwrite: bool, report_to: str,
           exit_stack: contextlib.ExitStack) -> tuple[Run, TrainState]:
    """Phase 1: the checks, the accelerator, the output directory's lock, the data, the model and
    optimizer, the loaders, the output directory and, with ``resume``, the latest checkpoint; the state the
    run goes on from. The lock is held until ``exit_stack`` closes.

    The random draws (weights, data order) happen in a fixed order after ``set_seed(recipe.seed)``, so that a
    run is the same every time; a resumed one then restores the checkpoint's RNG states.
    """
    accelerator = _accelerator(recipe, output_dir, report_to)
    check_output_flags(output_dir, resume, overwrite)
    # The lock first, and a save that a kill interrupted finished or undone, then what the folder holds.
    run_folder.lock_on_main_process(accelerator, output_dir, "balpoe-train", exit_stack)
    check_output_dir(output_dir, resume, overwrite, input_paths(recipe))
    check_model(recipe)
    for note in recipe.notes:
        accelerator.print(f"note: {note}")
    cores = len(os.sched_getaffinity(0))
    on_one_cpu_process = accelerator.device.type == "cpu" and accelerator.num_processes == 1
    if on_one_cpu_process and torch.get_num_threads() < cores:
        # A plain `accelerate launch` sets OMP_NUM_THREADS=1.
        accelerator.print(f"note: torch uses {torch.get_num_threads()} of {cores} CPU cores; "
                          f"`accelerate launch --num_cpu_threads_per_process {cores}` trains faster")
    set_seed(recipe.seed)

    # The long-tailed training split, its held-out part and the balanced test set.
    data = load_training_data(recipe)
    groups = shot_groups(data.class_counts, recipe.many_threshold, recipe.few_threshold)
    missing = absent_classes(labels_array(data.test, recipe.label_column), len(data.class_counts))
    if missing:
        accelerator.print(absent_classes_warning(missing, len(data.class_counts)))
    accelerator.print(_describe_data(recipe, data, groups))

    # The model and optimizer before the data loaders, so that a bad backbone fails fast; with the recipe's
    # speed options (channels_last, compile, fused SGD).
    model = build_model(recipe, data)
    if recipe.sync_batchnorm and accelerator.num_processes > 1:
        try:  # batch norm over the global batch, as in one process
            model = convert_sync_batchnorm(model, accelerator.device)
        except TypeError as error:
            raise TrainingError(str(error)) from None
    model = speed.prepare_model(model, recipe)
    signature = model_signature(model.config)
    optimizer = speed.build_optimizer(recipe, parameter_groups(model, recipe), accelerator.device)
    speed.enable_fast_kernels(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)

    # The device-resident pipeline or PIL in workers (balpoe_hf.data.loaders); either way an epoch's order and
    # augmentation are a function of (seed, epoch), so a resumed run sees exactly the batches the
    # uninterrupted run would have seen, also inside an epoch.
    processor = build_processor(recipe)
    loaders = build_loaders(recipe, data, processor, accelerator)
    accelerator.print(f"data pipeline: {loaders.pipeline.name} ({loaders.pipeline.reason})")
    holdout_loader = None
    if data.holdout is not None:  # evaluated like the test set, at the end, to calibrate the model
        holdout_loader = accelerator.prepare(DataLoader(
            evaluation_split(data.holdout, recipe, processor, "holdout"), batch_size=recipe.eval_batch_size,
            num_workers=recipe.num_workers, pin_memory=accelerator.device.type == "cuda"))
    steps_per_epoch = math.ceil(len(loaders.train) / recipe.gradient_accumulation_steps)
    # Stepped once per optimizer step by hand (not prepared): the schedule is in optimizer steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps_per_epoch))
    mixup = None
    if recipe.mixup_alpha > 0:
        # Soft targets (B, C) for BalPoELoss; no label smoothing, which would change the training prior.
        mixup = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=0.0, label_smoothing=0.0,
                      num_classes=len(data.class_counts))

    # The output directory, and the checkpoint to resume from.
    objects = checkpoints.TrainingObjects(model, optimizer, scheduler)
    built_groups = [dict(group) for group in optimizer.param_groups]
    saved = load_checkpoint(accelerator, output_dir, recipe, signature, len(loaders.train),
                                        objects) if resume else None
    if saved is not None:
        continue_schedule(optimizer, scheduler, built_groups, optimizer_steps_done(
            saved["epoch"], saved.get("step", 0), steps_per_epoch, recipe.gradient_accumulation_steps))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and output_dir.is_dir():
            clear_run_outputs(output_dir)
        start_run(output_dir, recipe)
    accelerator.wait_for_everyone()
    if resume and saved is None:
        accelerator.print(f"no checkpoint in {output_dir / checkpoints.CHECKPOINTS_DIR}: starting afresh")
    state = TrainState() if saved is None else TrainState.from_checkpoint(saved)
    state.model, state.batches_per_epoch = signature, len(loaders.train)
    state.gradient_accumulation_steps = recipe.gradient_accumulation_steps
    state.num_processes = accelerator.num_processes
    if report_to != "none":
        # TensorBoard's hparams take scalars only.
        accelerator.init_trackers("logs", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                                  for k, v in recipe.to_dict().items()})
    run = Run(recipe, output_dir, accelerator, data, groups, model, optimizer, scheduler, loaders,
              holdout_loader, processor, mixup, non_finite.NonFiniteLossGuard(accelerator.device),
              steps_per_epoch, run_start=0.0)
    accelerator.print(f"training {recipe.epochs} epochs of {steps_per_epoch} steps, global batch "
                      f"{run.global_batch} on {accelerator.num_processes} process(es) ({accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision})")
    run.run_start = time.perf_counter() - state.train_runtime  # the run's clock goes on from the checkpoint's
    return run, state


def _experts(losses: Sequence[float]) -> str:
    return "" if len(losses) < 2 else " (experts " + " / ".join(f"{loss:.4f}" for loss in losses) + ")"


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> float:
    """Phase 2: epoch ``epoch`` (from batch ``state.step`` when it resumes a step checkpoint), with its step
    checkpoints; updates ``state`` with its loss and images and returns its images per second.

    Logs the mean loss and each expert's at the logging points (``recipe.logging_steps``), and both per
    epoch: a BalPoE run that has one expert lag shows it there.
    """
    recipe, accelerator, model = run.recipe, run.accelerator, run.model
    first_batch, num_batches = state.step, len(run.loaders.train)
    if first_batch == 0:
        # Per-epoch seeds make shuffling, augmentation and mixup a function of (seed, epoch): resume-exact.
        # (Within an epoch, load_checkpoint has restored the RNG states that the step checkpoint saved.)
        set_seed(epoch_global_seed(recipe.seed, epoch), device_specific=True)
        state.epoch_loss_sum, state.epoch_expert_loss_sums = 0.0, None
    run.loaders.set_epoch(epoch)
    model.train()
    loss_sum = torch.full((), state.epoch_loss_sum, device=accelerator.device)
    expert_sums = torch.tensor(state.epoch_expert_loss_sums or [0.0] * recipe.num_experts,
                               device=accelerator.device)
    logged = (state.epoch_loss_sum, expert_sums.tolist(), first_batch)  # (loss sums, batches) at the last log
    optimizer_step = optimizer_steps_done(epoch, first_batch, run.steps_per_epoch,
                                          recipe.gradient_accumulation_steps)
    epoch_start, epoch_images = time.perf_counter(), 0
    progress = tqdm(epoch_batches(run.loaders.train, accelerator, first_batch),
                    desc=f"epoch {epoch + 1}/{recipe.epochs}", total=num_batches, initial=first_batch,
                    leave=False, disable=not accelerator.is_local_main_process)
    for step, batch in enumerate(progress, start=first_batch):
        pixel_values, targets = batch["pixel_values"], batch["labels"]
        if run.mixup is not None:
            pixel_values, targets = run.mixup(pixel_values, targets)
        else:  # soft targets skip the loss's label-range check, a host-device sync (checked at loading)
            targets = torch.nn.functional.one_hot(targets, len(run.data.class_counts)).float()
        with accelerator.accumulate(model):
            output = model(pixel_values=pixel_values, labels=targets)
            loss = output.loss
            if run.guard.update(loss, epoch * num_batches + step):
                run.stop_if_diverged()
            accelerator.backward(loss)
            if accelerator.sync_gradients and recipe.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        lr = run.scheduler.get_last_lr()[0]  # the rate this step trained with, before the scheduler moves on
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            run.scheduler.step()
        loss_sum += loss.detach()
        expert_sums += output.expert_losses.detach().float()
        epoch_images += pixel_values.shape[0] * accelerator.num_processes
        optimizer_step += accelerator.sync_gradients
        if accelerator.sync_gradients and optimizer_step % recipe.logging_steps == 0 \
                and accelerator.is_main_process:
            # A host-device synchronisation at logging points only: the mean losses since the last one.
            total, experts, batches = loss_sum.item(), expert_sums.tolist(), step + 1 - logged[2]
            window_loss = (total - logged[0]) / batches
            window_experts = [(now - then) / batches for now, then in zip(experts, logged[1], strict=True)]
            logged = (total, experts, step + 1)
            throughput = epoch_images / (time.perf_counter() - epoch_start)
            progress.set_postfix(loss=f"{window_loss:.3f}", lr=f"{lr:.4f}", img_s=f"{throughput:.0f}")
            accelerator.log({"train/loss": window_loss, "train/lr": lr,
                             **{f"train/loss_expert_{e}": v for e, v in enumerate(window_experts)}},
                            step=optimizer_step)
        every = recipe.checkpoint_every_steps
        if every and accelerator.sync_gradients and optimizer_step % every == 0 and step + 1 < num_batches:
            # A step checkpoint: resumed, the epoch goes on from the next batch.
            run.stop_if_diverged()
            run.save_checkpoint(replace(
                state, epoch=epoch, step=step + 1, train_runtime=time.perf_counter() - run.run_start,
                images_seen=state.images_seen + epoch_images,
                epoch_loss_sum=accelerator.reduce(loss_sum, reduction="mean").item(),
                epoch_expert_loss_sums=accelerator.reduce(expert_sums, reduction="mean").tolist()))
    run.stop_if_diverged()
    state.train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / num_batches
    state.train_expert_losses = [s / num_batches for s in
                                 accelerator.reduce(expert_sums, reduction="mean").tolist()]
    epoch_time = time.perf_counter() - epoch_start
    state.images_seen += epoch_images
    accelerator.print(f"epoch {epoch + 1}/{recipe.epochs}: loss {state.train_loss:.4f}"
                      f"{_experts(state.train_expert_losses)}, lr {lr:.5f}, "
                      f"{epoch_images / epoch_time:.0f} images/s, {epoch_time:.0f} s")
    accelerator.log({"train/epoch_loss": state.train_loss,
                     "train/images_per_second": epoch_images / epoch_time,
                     **{f"train/epoch_loss_expert_{e}": v for e, v in enumerate(state.train_expert_losses)}},
                    step=(epoch + 1) * run.steps_per_epoch)
    return epoch_images / epoch_time


def evaluate_and_calibrate(run: Run, calibrate: bool) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """Phase 3: the balanced test set's report and size; with ``calibrate`` (after the last epoch) the
    held-out calibration is fitted into the model's config first, so that the
    report shows their effect, and the held-out report is returned too (else ``None``)."""
    holdout_results = None
    if calibrate and run.holdout_loader is not None:
        holdout_results = calibrate_on_holdout(run.model, run.holdout_loader, run.accelerator, run.recipe,
                                               run.data.class_counts)
    report, num_test = evaluate(run.model, run.loaders.test, run.accelerator, run.recipe,
                                run.data.class_counts, len(run.data.test))
    return report, num_test, holdout_results


def _log_evaluation(run: Run, state: TrainState, epochs_done: int, report: dict[str, Any],
                    num_test: int, show: bool = True) -> None:
    state.eval_history.append({"epoch": epochs_done, "balanced_accuracy": report["balanced_accuracy"],
                               "accuracy": report["accuracy"], "ece": report["ece"]})
    if show:
        run.accelerator.print(format_balanced(report, f"eval after epoch {epochs_done} on {num_test:,} test "
                                                      "images:", run.groups))
    run.accelerator.log({f"eval/{k}": v for k, v in report.items() if isinstance(v, float)},
                        step=epochs_done * run.steps_per_epoch)


def save_outputs(run: Run, state: TrainState, report: dict[str, Any], num_test: int,
                 holdout_results: dict[str, Any] | None, throughputs: list[float], resumed_finished: bool
                 ) -> dict[str, Any]:
    """Phase 4: the model with its image processor, ``train_results.json``, ``eval_results.json`` and
    ``holdout_results.json``, and the printed summary; returns the training statistics.

    A run resumed from its final checkpoint (``resumed_finished``) keeps the statistics it saved.
    """
    recipe, accelerator, output_dir = run.recipe, run.accelerator, run.output_dir
    accelerator.wait_for_everyone()
    train_runtime = state.train_runtime if resumed_finished else time.perf_counter() - run.run_start
    model = speed.to_contiguous_format(accelerator.unwrap_model(run.model))
    results_file = output_dir / "train_results.json"
    keep_results = resumed_finished and results_file.is_file()
    train_results = json.loads(results_file.read_text()) if keep_results else {
        "epochs": recipe.epochs, "train_samples": len(run.data.train), "class_counts": run.data.class_counts,
        "holdout_counts": run.data.holdout_counts,
        "train_loss": state.train_loss, "train_expert_losses": state.train_expert_losses,
        "train_runtime": train_runtime,
        "train_samples_per_second": state.images_seen / train_runtime if state.images_seen else None,
        "epoch_images_per_second": throughputs, "data_pipeline": run.loaders.pipeline.name,
        "num_processes": accelerator.num_processes, "global_batch_size": run.global_batch,
        "eval_history": state.eval_history,
    }
    if not accelerator.is_main_process:
        return train_results
    eval_results = {"epoch": recipe.epochs, "eval_samples": num_test,
                    **{f"eval_{k}": v for k, v in report.items()}}
    if holdout_results is not None:
        holdout_results = {"epoch": recipe.epochs, **holdout_results, "calibration": model.config.calibration}
    # The model, its processor and the results at once, with the manifest: a kill or a full disk leaves the
    # old model or the new one. The held-out calibration is in the config already (evaluate_and_calibrate).
    files = {"eval_results.json": json.dumps(eval_results, indent=2)}
    if not keep_results:
        files["train_results.json"] = json.dumps(train_results, indent=2)
    if holdout_results is not None:
        files["holdout_results.json"] = json.dumps(holdout_results, indent=2)
    calibrate_and_save(model, output_dir, processor=run.processor, files=files,
                       then=", and the final checkpoint is intact: fix the cause and rerun with --resume, "
                            "which evaluates it and saves the model again")
    print("\n" + format_balanced(report, f"{recipe.name}: balanced test set ({num_test:,} images) after "
                                         f"{recipe.epochs} epochs", run.groups)
          + (f"\n{describe_auto(None)}" if holdout_results is None else
             f"\nheld-out split ({holdout_results['holdout_samples']:,} images): balanced accuracy "
             f"{percent(holdout_results['holdout_balanced_accuracy'])} %; "
             f"{describe_auto(model.config.calibration)}")
          + f"\nsaved to {output_dir}")
    return train_results


def _upload(output_dir: Path, hub_model_id: str) -> None:
    from ..hub.publish import push_to_hub

    try:
        url = push_to_hub(output_dir, hub_model_id)
    except (HubPublishError, HubFolderError) as error:
        raise TrainingFailure(f"training finished and the model is saved in {output_dir}, but the upload "
                            f"failed: {error}") from None
    print(f"pushed to {url}")


def train(recipe: Recipe, output_dir: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, report_to: str = "none", push_to_hub: bool = False,
          hub_model_id: str | None = None, deadline: float | None = None) -> TrainOutput:
    """The whole run: set-up, then each epoch with its evaluation and checkpoint, then the outputs.

    Args:
        recipe: the training settings (``balpoe_hf.recipes.load_recipe`` / ``make_recipe``).
        output_dir: where the model, results and checkpoints go (default ``runs/<recipe.name>``).
        resume: continue from the latest loadable checkpoint in ``output_dir`` (afresh if there is none).
        overwrite: delete what an earlier run wrote in ``output_dir`` (its manifest) first.
        report_to: ``"none"`` or ``"tensorboard"`` (logs in ``output_dir/logs``).
        push_to_hub, hub_model_id: upload the finished run to this Hub repository.
        deadline: a ``time.time()`` value: after each epoch's checkpoint, stop when the next epoch (timed
            as the last one) would end after it; the run is then unfinished (``finished=False``, no model
            saved) and ``resume=True`` continues it. For jobs with a wall-clock limit.

    Raises ``TrainingError`` (a message for the user) for bad settings, data or output directories.
    """
    output_dir = Path(output_dir if output_dir is not None else Path("runs") / recipe.name)
    _check_hub_upload_possible(push_to_hub, hub_model_id)
    _check_tracker(report_to)
    with contextlib.ExitStack() as exit_stack:  # the output directory's lock
        run, state = set_up(recipe, output_dir, resume=resume, overwrite=overwrite, report_to=report_to,
                            exit_stack=exit_stack)
        return _run_phases(run, state, recipe, deadline, push_to_hub, hub_model_id)


def _run_phases(run: Run, state: TrainState, recipe: Recipe, deadline: float | None, push_to_hub: bool,
                hub_model_id: str | None) -> TrainOutput:
    """Each epoch with its evaluation and checkpoint, then the outputs (and the upload)."""
    output_dir = run.output_dir
    start_epoch, report, holdout_results, throughputs = state.epoch, None, None, []
    for epoch in range(start_epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        throughputs.append(train_one_epoch(run, state, epoch))
        last = epoch + 1 == recipe.epochs
        if last or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0):
            report, num_test, holdout_results = evaluate_and_calibrate(run, calibrate=last)
            # The last epoch's report is the run's, printed once by save_outputs.
            _log_evaluation(run, state, epoch + 1, report, num_test, show=not last)
        state.epoch, state.step, state.epoch_loss_sum, state.epoch_expert_loss_sums = epoch + 1, 0, 0.0, None
        state.train_runtime = time.perf_counter() - run.run_start
        run.save_checkpoint(state)
        epoch_seconds = time.perf_counter() - epoch_start  # with its evaluation and checkpoint
        if not last and past_deadline(run.accelerator, deadline, epoch_seconds):
            run.accelerator.print(f"stopping after epoch {epoch + 1} of {recipe.epochs}: the next epoch "
                                  "would end after the deadline; resume to continue from its checkpoint")
            run.accelerator.end_training()
            return TrainOutput(output_dir=output_dir, eval_report=None, finished=False,
                               train_results={"epochs_done": epoch + 1, "epochs": recipe.epochs,
                                              "eval_history": state.eval_history})
    resumed_finished = start_epoch == recipe.epochs
    if report is None:  # resumed from the final checkpoint: only the evaluation and the outputs are left
        report, num_test, holdout_results = evaluate_and_calibrate(run, calibrate=True)
    train_results = save_outputs(run, state, report, num_test, holdout_results, throughputs, resumed_finished)
    run.accelerator.end_training()
    if push_to_hub and run.accelerator.is_main_process:
        _upload(output_dir, hub_model_id)
    return TrainOutput(output_dir=output_dir, eval_report=report, train_results=train_results)
