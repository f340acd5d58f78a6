"""The iteration-based training loop shared by the trainers: learning-rate schedule (with the linear
scaling rule), mixed precision, gradient clipping, NaN guard, an optional EMA of the weights, logging,
periodic checkpoints and evaluation.

What is trained is given as `step_fn(model, batch) -> {name: loss tensor}`; the total loss is their sum
(Detectron2's convention), so a detector and a classifier go through the same loop.

Under torchrun every process runs this loop on its share of each batch: the model is wrapped in
DistributedDataParallel, the logged losses are averaged over the processes, and the processes agree at
every iteration on whether to stop (a signal reached any of them, a loss is not finite), so that none is
left waiting for the others. Checkpoints hold every process's RNG state and are written by rank 0.
"""
import logging
import math
import os
import re
import signal
import threading
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterator, Optional

import torch
from tqdm import tqdm

from engine import distributed as dist, sync_batchnorm
from engine.checkpoint import Checkpointer, rng_state, set_rng_state
from engine.errors import ConfigError, DatasetError, TrainingError, TrainingInterrupted
from engine.device import setup_device
from engine.events import MetricsWriter, setup_logging
from engine.seeding import seed_everything
from engine.solver import lr_at, scale_to_world_size

logger = logging.getLogger("engine")

FINAL = "model_final.pth"


def amp_context(device: torch.device, enabled: bool, dtype: str):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def flat_metrics(metrics: Dict) -> Dict[str, float]:
    """{"bbox": {"AP": ..}} -> {"bbox/AP": ..} for metrics.jsonl and TensorBoard."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_metrics(value).items()})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class Trainer:
    """Runs `solver.max_iter` iterations of `step_fn` over `data` (an endless iterator of batches).

    evaluate: `evaluate(model) -> metrics dict`, called every `eval_period` iterations (default
        `test.eval_period`; 0: never during training; the caller runs the final evaluation).
    steps: the step schedule's iterations (default `solver.steps`).
    ema: an `engine.ema.ModelEMA` of `model`, updated after every step and saved in the checkpoints.

    `model` is the bare model (what is saved and evaluated); `step_fn` gets it wrapped for
    DistributedDataParallel when the run has several processes.
    """

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Iterator,
                 step_fn: Callable, checkpointer: Checkpointer, writer: MetricsWriter, device: torch.device,
                 max_iter: int, steps=None, evaluate: Optional[Callable] = None, eval_period: Optional[int] = None,
                 ema=None):
        self.cfg, self.model, self.optimizer, self.data = cfg, model, optimizer, data
        # On GPUs, torch's SyncBatchNorm kernels for SyncBN (in place: `model` is saved with them, same keys).
        self.train_model = dist.wrap_model(sync_batchnorm.for_device(model, device), device)
        self.step_fn, self.checkpointer, self.writer, self.device = step_fn, checkpointer, writer, device
        self.max_iter, self.steps, self.evaluate, self.ema = max_iter, steps, evaluate, ema
        self.eval_period = eval_period
        s = cfg.solver
        # Gradient scaling guards float16's narrow range; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.amp and s.amp_dtype == "float16")
        self.lr_scale = linear_lr_scale(s)
        self.last_checkpoint: Optional[str] = None

    def save(self, name: str, iteration: int) -> str:
        """Called by every process: rank 0 writes the checkpoint, with each rank's RNG state."""
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        if dist.world_size() > 1:
            rngs = dist.gather_to_main(rng_state())
            if rngs is not None:
                extra["rng_ranks"] = rngs
        if dist.is_main():
            self.last_checkpoint = self.checkpointer.save(name, self.model, iteration, self.optimizer,
                                                          self.scaler, **extra)
        else:
            self.last_checkpoint = self.checkpointer.path(name)
        return self.last_checkpoint

    def restore(self, state: Dict):
        """After `Checkpointer.resume` (model, optimizer, RNG states): the AMP scaler and the EMA weights
        from the same checkpoint `state` (nothing when it is empty: a fresh run)."""
        if not state:
            return
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == dist.world_size():
            set_rng_state(ranks[dist.rank()])
        elif ranks is not None or dist.world_size() > 1:
            logger.warning("%s was saved by %d process(es) and is resumed by %d: the random streams (RPN and "
                           "RoI sampling) continue differently than they would have", state.get("path"),
                           len(ranks) if ranks is not None else 1, dist.world_size())
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():  # saved without float16 scaling (AMP off, or bfloat16)
            logger.warning("%s was saved without float16 gradient scaling: the scale starts afresh at %g",
                           state.get("path", "the checkpoint"), self.scaler.get_scale())
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                logger.warning("%s holds no EMA weights (solver.ema was off); the average starts from the "
                               "resumed weights", state.get("path", "the checkpoint"))
                self.ema.load_state_dict(self.model.state_dict())

    def train(self, start_iter: int = 0):
        """Iterations start_iter .. max_iter - 1. SIGTERM or Ctrl-C (SIGINT) during training finishes the
        iteration under way, saves a checkpoint of it, and raises TrainingInterrupted: `--resume` then
        continues from exactly there."""
        self.iteration = start_iter
        with StopSignals() as stop:
            try:
                self._train(start_iter, stop)
            except RuntimeError as e:
                kept = self.last_checkpoint or "none saved yet"
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                # How torch.utils.data reports a worker process that died (killed, out of memory): raised
                # by the next batch, or by its SIGCHLD handler wherever the main process is.
                if "DataLoader worker" in str(e):
                    raise TrainingError(f"iteration {self.iteration}: a data loader worker died ({first_line}); "
                                        f"training stopped, the last checkpoint is kept ({kept}); continue with "
                                        "--resume, with fewer data.num_workers if memory ran out") from e
                if dist.is_peer_failure(e):
                    # gloo: "[.../pair.cc:561] Connection closed by peer [addr]:port. This is typically ..."
                    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0]
                    raise TrainingError(f"iteration {self.iteration}: another process of the distributed run "
                                        f"stopped answering ({reason}); training stopped, the last checkpoint is "
                                        f"kept ({kept}); torchrun names the process that failed first. Continue "
                                        "with --resume") from e
                raise

    def _train(self, start_iter: int, stop: "StopSignals"):
        s = self.cfg.solver
        period = self.cfg.test.eval_period if self.eval_period is None else self.eval_period
        self.model.train()
        self._stop, self.stop_signum = stop, 0
        with tqdm(total=self.max_iter, initial=start_iter, desc="train", dynamic_ncols=True,
                  disable=None if dist.is_main() else True) as bar:
            t_data = time.perf_counter()
            for it in range(start_iter, self.max_iter):
                self.iteration = it
                batch = next(self.data)
                t_step = time.perf_counter()
                lr = lr_at(s, it, self.max_iter, self.steps) * self.lr_scale
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                losses = self.run_step(it, batch)
                done = it + 1
                record = {"iter": it, "lr": lr, "loss": sum(losses.values()), **losses,
                          "data_time": t_step - t_data, "time": time.perf_counter() - t_data}
                if it == start_iter or done % s.log_period == 0 or done == self.max_iter:
                    self.writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                bar.update()
                if done < self.max_iter and s.checkpoint_period > 0 and done % s.checkpoint_period == 0:
                    self.save(f"model_{done:07d}.pth", done)
                if done < self.max_iter and period > 0 and done % period == 0 and self.evaluate is not None:
                    self.run_evaluation(done)
                signum = stop.signum if dist.world_size() == 1 else self.stop_signum
                if signum and done < self.max_iter:
                    name = f"model_{done:07d}.pth"
                    path = self.last_checkpoint if self.last_checkpoint and self.last_checkpoint.endswith(name) \
                        else self.save(name, done)
                    dist.barrier()  # no process exits before rank 0 has written the checkpoint
                    raise TrainingInterrupted(f"{signal.Signals(signum).name} at iteration {done} of "
                                              f"{self.max_iter}; checkpoint {path} saved, continue with --resume",
                                              signum)
                t_data = time.perf_counter()

    def run_step(self, it: int, batch) -> Dict[str, float]:
        s = self.cfg.solver
        try:
            with amp_context(self.device, s.amp, s.amp_dtype):
                losses = self.step_fn(self.train_model, batch)
        except DatasetError as e:
            # The model's input checks (a NaN or inf pixel, a malformed target): said with the iteration,
            # before any NaN reaches a loss or the weights.
            kept = self.last_checkpoint or "none saved yet"
            raise TrainingError(f"iteration {it}: bad batch: {e}; training stopped, the last good checkpoint is "
                                f"kept ({kept})") from e
        values = self.agree(losses)
        if not all(math.isfinite(v) for v in values.values()):
            kept = self.last_checkpoint or "none saved yet"
            raise TrainingError(f"iteration {it}: loss is not finite ({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); "
                                f"training stopped, the last good checkpoint is kept ({kept}). Lower solver.base_lr, "
                                "lengthen solver.warmup_iters or set solver.clip_grad_norm")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sum(losses.values())).backward()
        if s.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return values

    def agree(self, losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """The losses averaged over the processes. With several processes it also sets `stop_signum`: the
        signal that reached any of them by now (0: none). One all-reduce, before backward, so that all stop
        at the same iteration and none is left waiting in DistributedDataParallel's gradient all-reduce."""
        values = {k: float(v.detach()) for k, v in losses.items()}
        if dist.world_size() == 1:
            return values
        seen = self._stop.signum or 0
        packed = torch.tensor([*values.values(), seen != 0], dtype=torch.float64, device=self.device)
        summed = dist.all_reduce_sum(packed).tolist()
        self.stop_signum = seen or (signal.SIGTERM if summed[-1] else 0)
        return {k: v / dist.world_size() for k, v in zip(values, summed[:-1])}

    def run_evaluation(self, iteration: int) -> Dict:
        metrics = self.evaluate(self.model)
        self.model.train()
        self.writer.write({"iter": iteration, **flat_metrics(metrics)}, prefix="val")
        return metrics


def start_run(cfg, epochs: bool = False) -> torch.device:
    """What every training run does first: join torchrun's process group when there is one and take this
    process's device, set up log.txt (rank 0) and the seeds (each process its own random stream; DDP starts
    all of them from rank 0's initial weights), and settle the batch, lr and lengths for the number of
    processes and what the command line set (`engine.solver.scale_to_world_size`; `epochs`: a
    classification schedule). Returns the device."""
    device = setup_device(cfg)
    setup_logging(cfg.output_dir)
    seed_everything(cfg.seed + dist.rank())
    scale_to_world_size(cfg, dist.world_size(), epochs=epochs)
    return device


def close_run(writer: MetricsWriter, plot: Optional[Callable] = None):
    """The end of a training run, however it ended: close the metrics files and, on rank 0, draw the curves
    (`plot(history)`). SIGTERM and SIGINT are held off meanwhile: when a process of a torchrun job fails,
    torchrun sends SIGTERM to the others while they clean up, and their error reports must still come out."""
    with StopSignals():
        writer.close()
        if plot is not None and dist.is_main():
            plot(writer.history)


class StopSignals:
    """While active, SIGTERM and SIGINT are recorded (`signum`) instead of ending the process, so the loop
    can stop between iterations with a checkpoint. Outside the main thread (where Python cannot install
    handlers) it does nothing. Previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum
        logger.warning("%s received: stopping after this iteration with a checkpoint",
                       signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def linear_lr_scale(solver_cfg) -> float:
    """The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): with
    `solver.reference_batch_size` > 0, `solver.base_lr` is the rate for that many images and the rate used
    is base_lr * ims_per_batch / reference_batch_size (ImageNet: 0.1 per 256 images). 1.0 when off."""
    s = solver_cfg
    if s.reference_batch_size == 0:
        return 1.0
    scale = s.ims_per_batch / s.reference_batch_size
    logger.info("learning rate %.4g = solver.base_lr %.4g x ims_per_batch %d / reference_batch_size %d",
                s.base_lr * scale, s.base_lr, s.ims_per_batch, s.reference_batch_size)
    return scale


def weights_to_evaluate(cfg, weights: Optional[str] = None) -> str:
    """What `--eval-only` evaluates: `weights`, else `model.weights`, else the run's model_final.pth, else
    its last checkpoint."""
    path = weights or cfg.model.weights
    if path:
        return path
    final = os.path.join(cfg.output_dir, FINAL)
    path = final if os.path.isfile(final) else Checkpointer(cfg.output_dir).last()
    if path is None:
        raise ConfigError(f"--eval-only needs weights: set model.weights=PATH, or train first so that "
                          f"{cfg.output_dir} holds {FINAL} or a checkpoint")
    return path
