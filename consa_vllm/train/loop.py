"""The training loop: stage 1 (gates + Lagrangian, optionally weights), binarise, stage 2.

Everything around the loop (data, gate math, multipliers, checkpoints, plots, export) lives in
its own small module; what is here is setup, one step, and the two stages.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consa_vllm.allocation import Allocation, atomic_write_text, plot_allocation, render_text

from . import checkpoint as ckpt
from . import dist
from .config import RUN_ARTIFACTS, ConfigError, TrainConfig, TrainingDiverged, check_resume_settings
from .data import PackedData, load_data
from .gates import binarize_topk, expand, expected_sparsity, mask_to_pattern, prob_nonzero, sample_z
from .lagrangian import Lagrangian, target_at


def patch_model(model, window: int, sink: int = 0):
    """The reference hybrid attention (imported late: it pulls in transformers); S = sink + window."""
    from consa_vllm.reference import patch_model as _patch
    return _patch(model, window=window, allocation=None, sink=sink)


class GatedLM(nn.Module):
    """Model + gates + multipliers in one module, so that DDP/FSDP see every trainable tensor."""

    def __init__(self, model: nn.Module, state: Any, units_per_layer: int, init_log_alpha: float,
                 num_constraints: int, device: torch.device | None = None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "state", state)  # not a submodule: it may hold the model itself
        self.num_kv_heads = state.num_kv_heads
        # Created on the target device directly: under FSDP the model is sharded in place and
        # must not be moved by a blanket ``.to()``.
        self.log_alpha = nn.Parameter(torch.full((state.num_layers, units_per_layer), float(init_log_alpha),
                                                 device=device))
        self.lagrangian = Lagrangian(num_constraints).to(device)

    def forward(self, input_ids: torch.Tensor, u: torch.Tensor | None = None, target: float = 0.0):
        """Stage 1 (``u`` given): (task loss, penalty, expected sparsity, sampled z). Stage 2: task loss."""
        if u is None:
            return self.model(input_ids=input_ids, labels=input_ids).loss
        z = sample_z(self.log_alpha, u)
        self.state.set_gates(expand(z, self.num_kv_heads))
        task = self.model(input_ids=input_ids, labels=input_ids).loss
        s_hat = expected_sparsity(self.log_alpha, per_layer=self.lagrangian.lambda1.numel() > 1)
        return task, self.lagrangian(s_hat, target), s_hat.detach(), z.detach()


# ------------------------------------------------------------------------------ setup


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer of ``--tokenizer`` (default ``--model``); one clear error if it cannot be loaded."""
    from transformers import AutoTokenizer
    src = cfg.tokenizer or cfg.model
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # transformers raises many types here
        raise ConfigError(f"--tokenizer {src}: cannot load the tokenizer ({e})") from None
    tok.model_max_length = int(1e30)  # we pack ourselves; silence "sequence too long" warnings
    return tok


def load_model(cfg: TrainConfig, device: torch.device):
    """The HF causal LM in ``--dtype`` on ``device``, KV cache off (training only)."""
    return load_causal_lm(cfg.model, cfg.dtype, device)


def load_causal_lm(path: str | Path, dtype: str, device: torch.device | str):
    """The HF causal LM at ``path`` in ``dtype`` on ``device``, KV cache off (also ``consa-vllm eval``'s).

    Weights that cannot be read (a truncated or corrupted file) are one :class:`ConfigError`
    naming ``--model``, not the loader's traceback.
    """
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    except Exception as e:  # transformers and safetensors raise many types here
        raise ConfigError(f"--model {path}: cannot load the model ({' '.join(str(e).split())})") from None
    model.config.use_cache = False
    return model.to(device)


def noise(seed: int, global_micro: int, shape: torch.Size) -> torch.Tensor:
    """Gate noise u as a pure function of (seed, global micro-batch index): resumable, rank-split."""
    g = torch.Generator().manual_seed((seed % 2**31) * 2**31 + global_micro)
    return torch.rand(shape, generator=g)


# ------------------------------------------------------------------------------ loop


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # Everything that differs between one process, DDP and FSDP goes through self.par.
        self.par = dist.Parallel.from_env(cfg.device, cfg.fsdp)
        self.rank, self.world, self.device = self.par.rank, self.par.world, self.par.device
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        # Everything that can fail on bad input runs before anything is written.
        self.tokenizer = load_tokenizer(cfg)
        self.data: PackedData = load_data(cfg.data, self.tokenizer, cfg.seq_len, cfg.seed, cfg.text_field,
                                          cfg.max_tokens)
        model = load_model(cfg, self.par.load_device)
        try:
            self.state = patch_model(model, cfg.window, cfg.sink)
        except ValueError as e:
            raise ConfigError(f"--model {cfg.model}: {e}") from None
        per_layer = cfg.constraint == "per-layer"
        units = 1 if cfg.granularity == "layer" else self.state.num_kv_heads
        self.par.shard(model)
        self.net = GatedLM(model, self.state, units, cfg.init_log_alpha,
                           self.state.num_layers if per_layer else 1, device=self.device)
        self.ckpt_root = cfg.log_path / "checkpoints"
        self.metrics_path = cfg.log_path / "metrics.jsonl"
        self.step, self.history, self.last_ckpt = 0, [], None
        self.stage1_final: dict[str, Any] = {}
        self.elapsed = 0.0

    # -------------------------------------------------------------- optimizers
    def make_optimizers(self, stage: int) -> dict[str, torch.optim.Optimizer]:
        cfg, net = self.cfg, self.net
        weights = [p for p in net.model.parameters()]
        train_weights = stage == 2 or not cfg.freeze_weights
        for p in weights:
            p.requires_grad_(train_weights)
        net.log_alpha.requires_grad_(stage == 1)
        net.lagrangian.requires_grad_(stage == 1)
        opts: dict[str, torch.optim.Optimizer] = {}
        if train_weights:
            opts["weights"] = torch.optim.AdamW(weights, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        if stage == 1:
            opts["gates"] = torch.optim.Adam([net.log_alpha], lr=cfg.gate_lr)
            opts["lagrangian"] = net.lagrangian.optimizer(cfg.lagrangian_lr)
        return opts

    # -------------------------------------------------------------- one step
    def train_step(self, wrapped: nn.Module, opts: dict, stage: int) -> dict[str, Any]:
        cfg, step = self.cfg, self.step
        t = target_at(step, cfg.steps, cfg.target_sparsity, cfg.target_warmup) if stage == 1 else None
        sums = torch.zeros(3, device=self.device)  # task, penalty, sampled sparsity
        s_hat = None
        for m in range(cfg.grad_accum):
            x = self.data.micro_batch(step, m, cfg.grad_accum, cfg.batch_size, self.rank, self.world).to(self.device)
            sync = m == cfg.grad_accum - 1 or self.world == 1
            with self.par.micro_batch(self.net, wrapped, sync):
                if stage == 1:
                    g = (step * cfg.grad_accum + m) * self.world + self.rank
                    task, pen, s_hat, z = wrapped(x, noise(cfg.seed, g, self.net.log_alpha.shape), t)
                    ((task + pen) / cfg.grad_accum).backward()
                    sums += torch.stack([task.detach().float(), pen.detach().float(), (z == 0).float().mean()])
                else:
                    task = wrapped(x)
                    (task / cfg.grad_accum).backward()
                    sums[0] += task.detach().float()
        sums /= cfg.grad_accum
        self.par.reduce_replicated_grads(self.net)
        if self.world > 1:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.AVG)
        if not torch.isfinite(sums).all():
            where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else \
                "no checkpoint was written yet (see --checkpoint-every)"
            raise TrainingDiverged(f"loss became {sums[0].item()} at step {step} (stage {stage}); stopped without "
                                   f"updating; {where}. Try a lower --lr/--gate-lr or --dtype float32.")
        # The record describes the parameters this step's forward passes used: every value is
        # read before the optimizers update them (the loss and penalty can only be).
        rec: dict[str, Any] = {"step": step, "stage": stage, "loss": sums[0].item()}
        if stage == 1:
            lag = self.net.lagrangian
            rec.update(penalty=sums[1].item(), target=t, sampled_sparsity=sums[2].item(),
                       expected_sparsity=expected_sparsity(self.net.log_alpha.detach()).item(),
                       lambda1=lag.lambda1.detach().cpu().tolist(), lambda2=lag.lambda2.detach().cpu().tolist())
            if s_hat is not None and s_hat.numel() > 1:
                rec["expected_sparsity_per_layer"] = s_hat.cpu().tolist()
        if "weights" in opts and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.model.parameters(), cfg.grad_clip)
        for o in opts.values():
            o.step()
            o.zero_grad(set_to_none=True)
        return rec

    # -------------------------------------------------------------- checkpoints
    def state_dict(self, opts: dict, stage: int) -> dict[str, Any]:
        trainable = {"log_alpha": self.net.log_alpha, "lambda1": self.net.lagrangian.lambda1,
                     "lambda2": self.net.lagrangian.lambda2}
        # FSDP: full (gathered) states, keyed by parameter name: resumable with any world size.
        optimizers = {k: self.par.optimizer_state(self.net, o) for k, o in opts.items()}
        st = {"config": self.cfg.to_dict(), "stage": stage, "trainable": trainable, "rng": ckpt.rng_state(),
              "optimizers": optimizers, "stage1_final": self.stage1_final, "elapsed": self.elapsed,
              "fsdp": self.cfg.fsdp, "world_size": self.world}
        if "weights" in opts:
            st["model"] = self.par.model_state(self.net.model)
        return st

    def save(self, opts: dict, stage: int) -> None:
        st = self.state_dict(opts, stage)  # every rank joins (FSDP gathers are collective)
        if self.main:
            self.last_ckpt = ckpt.save_checkpoint(self.ckpt_root, self.step, st, self.cfg.keep_checkpoints)

    def resume(self) -> tuple[dict[str, Any] | None, int]:
        cfg = self.cfg
        if self.main:  # a write killed midway: its checkpoint back in place before any rank reads one
            for note in ckpt.recover_interrupted_writes(self.ckpt_root):
                print(f"note: {note}", file=sys.stderr)
        self.par.wait_for_all()
        path = ckpt.latest_checkpoint(self.ckpt_root) if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            if self.main:
                print(f"note: --resume: no checkpoint in {self.ckpt_root}, starting from step 0", file=sys.stderr)
            return None, 1
        try:
            step, st = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as e:  # damaged after validate() checked it, or a bad tensor
            raise ConfigError(ckpt.explain_bad_checkpoint(e, path)) from None
        # validate() compared the settings already; this catches a checkpoint replaced since.
        check_resume_settings(cfg, st["config"], bool(st.get("fsdp")), path, st.get("world_size"), self.world)
        with torch.no_grad():
            self.net.log_alpha.copy_(st["trainable"]["log_alpha"])
            self.net.lagrangian.lambda1.copy_(st["trainable"]["lambda1"])
            self.net.lagrangian.lambda2.copy_(st["trainable"]["lambda2"])
        if "model" in st:
            self.par.load_model_state(self.net.model, st["model"])
        ckpt.set_rng_state(st["rng"])
        self.step, self.last_ckpt = step, path
        self.stage1_final, self.elapsed = st.get("stage1_final") or {}, st.get("elapsed", 0.0)
        if self.main:
            print(f"resumed from {path} at step {step}", file=sys.stderr)
        return st["optimizers"], st["stage"]

    # -------------------------------------------------------------- logging
    def open_logs(self) -> None:
        if self.step == 0:  # a new run: nothing of an earlier one stays in its folder (validate needs --force)
            remove_earlier_run(self.cfg)
        self.made_log_root = first_missing(self.cfg.log_path)
        self.cfg.log_path.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.metrics_path.exists():  # after a resume, drop what the checkpoint does not cover
            kept = [json.loads(l) for l in self.metrics_path.read_text().splitlines() if l.strip()]
            kept = [r for r in kept if r["step"] < self.step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        self.metrics_file = open(self.metrics_path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.cfg.log_path / "tensorboard"), purge_step=self.step)
        except ImportError:  # optional: metrics.jsonl has everything; say so rather than skip silently
            print("note: the tensorboard package is not installed; metrics go to metrics.jsonl only "
                  "(pip install tensorboard for TensorBoard event files)", file=sys.stderr)

    def log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    # -------------------------------------------------------------- stages
    def run_stage(self, stage: int, end: int, opt_states: dict | None) -> None:
        from tqdm import tqdm
        cfg = self.cfg
        opts = self.make_optimizers(stage)
        if opt_states:
            for k, o in opts.items():
                if k in opt_states:
                    self.par.load_optimizer_state(self.net, o, opt_states[k])
        wrapped = self.par.wrap(self.net)
        wrapped.train()
        bar = tqdm(total=end, initial=self.step, desc=f"stage {stage}", disable=not (self.main and cfg.progress),
                   dynamic_ncols=True, file=sys.stderr)
        while self.step < end:
            t0 = time.perf_counter()
            rec = self.train_step(wrapped, opts, stage)
            self.step += 1
            dt = time.perf_counter() - t0
            self.elapsed += dt
            tokens = cfg.batch_size * cfg.grad_accum * self.world * cfg.seq_len
            rec.update(step_time_s=dt, tokens_per_s=tokens / dt, tokens=self.step * tokens)
            if self.device.type == "cuda":  # this rank's peak so far: shows what FSDP sharding saves
                rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.main:
                self.log(rec)
                post = {"loss": f"{rec['loss']:.4f}"}
                if stage == 1:
                    l1, l2 = rec["lambda1"], rec["lambda2"]
                    post.update(s=f"{rec['expected_sparsity']:.3f}", t=f"{rec['target']:.3f}",
                                l1=f"{sum(l1) / len(l1):+.3f}", l2=f"{sum(l2) / len(l2):.3f}")
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if stage == 1 and self.step == cfg.steps:
                self.stage1_final = {k: rec[k] for k in ("loss", "penalty", "expected_sparsity", "target",
                                                         "lambda1", "lambda2")}
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(opts, stage)
        bar.close()

    def allocation(self) -> Allocation:
        cfg, la = self.cfg, self.net.log_alpha.detach().float().cpu()
        keep = binarize_topk(la, cfg.target_sparsity, per_layer=cfg.constraint == "per-layer")
        alloc = Allocation(granularity=cfg.granularity, window=cfg.window, sink=cfg.sink,
                           pattern=mask_to_pattern(keep, self.state.num_kv_heads))
        p = prob_nonzero(la)
        return alloc.with_extra(
            target_sparsity=cfg.target_sparsity, achieved_sparsity=alloc.sparsity,
            num_layers=self.state.num_layers, num_kv_heads=self.state.num_kv_heads,
            training={
                "trainer": "consa_vllm.train", "method": "hard-concrete L0 gates + augmented Lagrangian",
                "args": cfg.to_dict(), "data_sha256": self.data.sha256, "stage1_steps": cfg.steps,
                "stage2_steps": cfg.stage2_steps, "world_size": self.world, "tokens_stage1": cfg.steps * cfg.batch_size * cfg.grad_accum
                * self.world * cfg.seq_len, "final": self.stage1_final,
                "expected_sparsity": expected_sparsity(la).item(), "duration_s": round(self.elapsed, 3),
                "log_alpha": la.tolist(), "p_nonzero": p.tolist(),
            })

    def fixed_allocation(self) -> Allocation:
        """``--allocation``: the given allocation (stage 1 skipped), with this run's provenance."""
        cfg = self.cfg
        alloc = Allocation.load(cfg.allocation)
        return alloc.with_extra(
            target_sparsity=alloc.sparsity, achieved_sparsity=alloc.sparsity,
            num_layers=self.state.num_layers, num_kv_heads=self.state.num_kv_heads,
            training={
                "trainer": "consa_vllm.train", "method": "stage 2 only: weights trained with a fixed allocation",
                "allocation_file": str(cfg.allocation), "args": cfg.to_dict(),
                "data_sha256": self.data.sha256, "stage1_steps": 0,
                "stage2_steps": cfg.stage2_steps, "world_size": self.world,
                # Where the allocation came from (a learned one's own provenance), kept.
                "source_training": (alloc.model_extra or {}).get("training"),
            })

    def run(self) -> Allocation:
        cfg = self.cfg
        opt_states, stage = self.resume() if cfg.resume else (None, 1)
        if self.main:
            self.open_logs()
        try:
            return self._run(opt_states, stage)
        except BaseException:
            if self.main and not self.history and self.last_ckpt is None:
                self.metrics_file.close()
                if self.tb:
                    self.tb.close()
                discard_empty_logs(cfg.log_path, self.made_log_root)
            raise

    def _run(self, opt_states: dict | None, stage: int) -> Allocation:
        cfg = self.cfg
        if self.step < cfg.steps:
            self.run_stage(1, cfg.steps, opt_states)
        if stage == 1:  # stage 2 starts with fresh optimizers
            opt_states = None
        alloc = self.fixed_allocation() if cfg.allocation else self.allocation()
        if cfg.stage2_steps:
            self.state.set_allocation(alloc)
            self.state.set_gates(None)
            self.run_stage(2, cfg.total_steps, opt_states)
        # FSDP: gather the shards (collective), rank 0 writes them.
        weights = self.par.weights_to_save(self.net.model) if cfg.save_model else None
        if self.main:
            self.finish(alloc, weights)
        self.par.wait_for_all()  # every rank leaves once rank 0 has written everything
        return alloc

    def finish(self, alloc: Allocation, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0: close the logs, write the model (``weights``: gathered FSDP state), allocation and plots."""
        from .plots import gate_probabilities, plot_curves
        cfg = self.cfg
        self.metrics_file.close()
        if self.tb:
            self.tb.close()
        if cfg.stage2_steps:
            final2 = [r for r in self.history if r["stage"] == 2]
            train = dict(alloc.model_extra["training"], final_stage2={"loss": final2[-1]["loss"]} if final2 else {})
            alloc = alloc.with_extra(training=train)
        if cfg.save_model:
            from .export import save_trained_model
            self.state.disable()  # restore the stock config before save_pretrained
            save_trained_model(self.net.model, self.tokenizer, alloc, Path(cfg.save_model), cfg.model,
                               state_dict=weights)
            print(f"model with the allocation embedded: {cfg.save_model}", file=sys.stderr)
        alloc.save(cfg.out)
        plot_allocation(alloc, cfg.log_path / "allocation.png", title=Path(cfg.out).name,
                        probabilities=gate_probabilities(alloc))
        plot_curves(self.history, cfg.log_path / "curves.png")
        print(render_text(alloc), file=sys.stderr)
        print(f"allocation: {cfg.out}\nlogs, checkpoints and plots: {cfg.log_path}", file=sys.stderr)


def remove_earlier_run(cfg: TrainConfig) -> None:
    """A new run (either method): remove what an earlier run wrote in its log folder
    (:data:`RUN_ARTIFACTS`) and, under ``--force``, its ``--out``, so that a folder never mixes
    two runs. :func:`~consa_vllm.train.config.validate` has refused an earlier run's files
    without ``--force`` (or ``--resume``, whose run found no checkpoint and starts afresh)."""
    log = cfg.log_path
    gone = [log / a for a in RUN_ARTIFACTS if (log / a).exists()]
    if cfg.force and cfg.out_path.exists():
        gone.append(cfg.out_path)
    for p in gone:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if gone:
        print(f"note: removed the earlier run's {', '.join(map(str, gone))}", file=sys.stderr)


def first_missing(path: Path) -> Path | None:
    """The highest of ``path`` and its parents that does not exist: what ``mkdir(parents=True)`` creates."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def discard_empty_logs(log: Path, made_root: Path | None) -> None:
    """Remove what a run that stopped before recording its first step left in ``log``: an
    empty ``metrics.jsonl`` and TensorBoard's empty event file, and the folders the run made
    (``made_root``: :func:`first_missing` before it made them) where they are empty now.
    Nothing was learned, and without them the corrected command runs again without --force
    (they would read as an earlier run)."""
    for name in ("metrics.jsonl", "tensorboard"):
        path = log / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    if made_root is None:
        return
    for folder in (log, *log.parents):
        try:
            folder.rmdir()
        except OSError:  # something else is in it: leave it and its parents
            return
        if folder == made_root:
            return


def train(cfg: TrainConfig) -> Allocation:
    """Train on ``cfg`` (one process, or one rank of torchrun) and return the allocation."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            # FSDP's modules and device mesh still hold the gloo process group, whose worker
            # threads hold tensors: left to interpreter finalization, its destructor aborted a
            # CPU rank at exit ("terminate called without an active exception", SIGABRT, after
            # every file was written; a clean-clone CI run of session 17). Free them now.
            del trainer
            gc.collect()

