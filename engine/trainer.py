"""The iteration-based training loop shared by the trainers: learning-rate schedule, mixed precision,
gradient clipping, NaN guard, logging, periodic checkpoints and evaluation.

What is trained is given as `step_fn(model, batch) -> {name: loss tensor}`; the total loss is their sum
(Detectron2's convention), so a detector and a classifier go through the same loop.
"""
import logging
import math
import time
from contextlib import nullcontext
from typing import Callable, Dict, Iterator, Optional

import torch
from tqdm import tqdm

from engine.checkpoint import Checkpointer
from engine.errors import TrainingError
from engine.events import MetricsWriter
from engine.solver import lr_at

logger = logging.getLogger("engine")


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

    evaluate: `evaluate(model) -> metrics dict`, called every `test.eval_period` iterations (0: never
        during training; the caller runs the final evaluation).
    """

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Iterator,
                 step_fn: Callable, checkpointer: Checkpointer, writer: MetricsWriter, device: torch.device,
                 max_iter: int, steps=None, evaluate: Optional[Callable] = None):
        self.cfg, self.model, self.optimizer, self.data = cfg, model, optimizer, data
        self.step_fn, self.checkpointer, self.writer, self.device = step_fn, checkpointer, writer, device
        self.max_iter, self.steps, self.evaluate = max_iter, steps, evaluate
        s = cfg.solver
        # Gradient scaling guards float16's narrow range; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.amp and s.amp_dtype == "float16")
        self.last_checkpoint: Optional[str] = None

    def save(self, name: str, iteration: int) -> str:
        self.last_checkpoint = self.checkpointer.save(name, self.model, iteration, self.optimizer, self.scaler)
        return self.last_checkpoint

    def train(self, start_iter: int = 0):
        s, period = self.cfg.solver, self.cfg.test.eval_period
        self.model.train()
        with tqdm(total=self.max_iter, initial=start_iter, desc="train", dynamic_ncols=True, disable=None) as bar:
            t_data = time.perf_counter()
            for it in range(start_iter, self.max_iter):
                batch = next(self.data)
                t_step = time.perf_counter()
                lr = lr_at(s, it, self.max_iter, self.steps)
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
                t_data = time.perf_counter()

    def run_step(self, it: int, batch) -> Dict[str, float]:
        s = self.cfg.solver
        with amp_context(self.device, s.amp, s.amp_dtype):
            losses = self.step_fn(self.model, batch)
        values = {k: float(v.detach()) for k, v in losses.items()}
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
        return values

    def run_evaluation(self, iteration: int) -> Dict:
        metrics = self.evaluate(self.model)
        self.model.train()
        self.writer.write({"iter": iteration, **flat_metrics(metrics)}, prefix="val")
        return metrics
