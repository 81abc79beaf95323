"""Trainer configuration: a dataclass, its command line, and validation before any heavy work."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from consa_vllm import families
from consa_vllm.cli_args import UsageParser, device_problem, path_arg, whole_number
from consa_vllm.outputs import output_problem

PROG = "python -m consa_vllm.train"
#: What a run writes into its log folder; a new run (--force) removes an earlier run's.
RUN_ARTIFACTS = ("metrics.jsonl", "checkpoints", "tensorboard", "allocation.png", "curves.png")
#: The range of --init-log-alpha. Beyond +-15.4 every hard-concrete sample is exactly 0 or 1
#: (the noise's logit lies within +-13.8, BETA is 2/3, the stretch clamps beyond ln 11), so the
#: task loss gives the gates no gradient; 1e308 is not even a float32.
MAX_INIT_LOG_ALPHA = 15.0


class ConfigError(ValueError):
    """A bad argument: the message names the flag (and the file) at fault."""


class DataError(ValueError):
    """Unreadable or unusable data; the message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    # what to train on
    model: str = ""
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str | None = None
    seq_len: int = 2048
    max_tokens: int | None = None
    # the method
    method: Literal["consa", "duo"] = "consa"
    duo_l1: float = 0.05  # --method duo: weight of the L1 penalty on the gates
    target_sparsity: float = 0.5
    granularity: Literal["layer", "kv_head"] = "kv_head"
    constraint: Literal["global", "per-layer"] = "per-layer"
    window: int = 512
    sink: int = 0
    init_log_alpha: float = 3.0
    target_warmup: float = 0.5
    # optimisation
    steps: int = 200
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    gate_lr: float = 0.1
    lagrangian_lr: float = 1.0
    grad_clip: float = 1.0
    freeze_weights: bool = False
    # stage 2
    stage2_steps: int = 0
    save_model: str | None = None
    allocation: str | None = None  # stage 2 only, with this fixed allocation (stage 1 skipped)
    # output and runtime
    out: str = "allocation.json"
    log_dir: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    fsdp: bool = False
    progress: bool = True
    force: bool = False  # replace an earlier run's --out and log folder

    # ------------------------------------------------------------------ derived
    @property
    def out_path(self) -> Path:
        """The allocation file this run writes (``--out``)."""
        return Path(self.out)

    @property
    def log_path(self) -> Path:
        if self.log_dir:
            return Path(self.log_dir)
        p = Path(self.out)
        return p.with_name(p.stem + ".logs")

    @property
    def total_steps(self) -> int:
        return self.steps + self.stage2_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields that may change between a run and its resumption without changing the result.
# (--grad-accum may change with the number of processes: check_resume_settings compares their product.)
RESUME_FREE_FIELDS = {"resume", "progress", "checkpoint_every", "keep_checkpoints", "device", "log_dir",
                      "out", "save_model", "fsdp", "force"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where it tells something: not to required flags, flags without a
    default, switches (on/off is in their help) or helps that give the default themselves.
    The description and the example keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is None or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The trainer's command line; a usage error is one line naming the flag (exit status 2)."""
    d = TrainConfig()
    tokens, count = whole_number("tokens"), whole_number("a count")
    p = UsageParser(
        prog=prog,
        description=(
            "Learn which attention units (layers or KV heads) of a model can use sliding-window\n"
            "attention (S) and which need full attention (F). Hard-concrete L0 gates mix full and\n"
            "sliding-window attention per unit; an augmented Lagrangian drives the expected sparsity\n"
            "to --target-sparsity; at the end an exact top-k binarises the gates and the allocation\n"
            "file is written to --out."),
        epilog=(
            "example:\n"
            f"  {prog} --model ./Qwen3-0.6B --data ./corpus/ \\\n"
            "      --target-sparsity 0.75 --granularity kv_head --constraint per-layer --window 4096 \\\n"
            "      --seq-len 8192 --steps 500 --freeze-weights --out alloc.json --log-dir runs/alloc\n"
            "  consa-vllm show alloc.json --png alloc.png\n"
            "  consa-vllm export --model ./Qwen3-0.6B --allocation alloc.json --out ./Qwen3-0.6B-consa"),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, type=path_arg, metavar="DIR",
                   help="local Hugging Face checkpoint directory of a supported family: " + families.supported_summary())
    g.add_argument("--data", required=True, nargs="+", type=path_arg, metavar="PATH",
                   help="text (.txt/.md/.py/...), .jsonl or .parquet files or folders of them, "
                        "or a folder written by datasets' save_to_disk")
    g.add_argument("--text-field", default=d.text_field, help="column/key holding the text in jsonl, parquet and datasets")
    g.add_argument("--tokenizer", default=None, type=path_arg, metavar="DIR",
                   help="tokenizer directory (default: --model)")
    g.add_argument("--seq-len", type=tokens, default=d.seq_len, help="tokens per packed training sequence")
    g.add_argument("--max-tokens", type=tokens, default=None, help="stop reading data after this many tokens")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["consa", "duo"], default=d.method,
                   help="consa: hard-concrete L0 gates + augmented Lagrangian (the default). duo: DuoAttention-style "
                        "identification: one gate in [0, 1] per KV head mixes full and sink + window attention, "
                        "trained (weights frozen) to match the dense model's last hidden states on synthetic "
                        "passkey/key-value documents built from --data, plus --duo-l1 x mean gate; binarised at "
                        "--target-sparsity with import-duo's quantile rule")
    g.add_argument("--duo-l1", type=float, default=d.duo_l1,
                   help="--method duo: weight of the L1 penalty (mean gate) added to the distillation loss")
    g.add_argument("--target-sparsity", type=float, default=d.target_sparsity,
                   help="fraction of units that become sliding-window (S), in [0, 1]")
    g.add_argument("--granularity", choices=["layer", "kv_head"], default=d.granularity,
                   help="one gate per layer, or one per KV head (with its query group)")
    g.add_argument("--constraint", choices=["global", "per-layer"], default=d.constraint,
                   help="one sparsity constraint over all units, or the same sparsity in every layer "
                        "(per-layer needs --granularity kv_head)")
    g.add_argument("--window", type=tokens, default=d.window, help="sliding window W in tokens (query i sees keys i-W+1..i)")
    g.add_argument("--sink", type=whole_number("sink tokens"), default=d.sink, metavar="N",
                   help="attention-sink tokens: S units also see keys 0..N-1 (the gates mix full attention with "
                        "sink + window attention; the allocation file records N)")
    g.add_argument("--init-log-alpha", type=float, default=d.init_log_alpha,
                   help=f"initial gate log_alpha, in [-{MAX_INIT_LOG_ALPHA:g}, {MAX_INIT_LOG_ALPHA:g}] (high = every "
                        "unit starts as full attention)")
    g.add_argument("--target-warmup", type=float, default=d.target_warmup,
                   help="fraction of the stage-1 steps over which the target ramps linearly from 0")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=count, default=d.steps, help="stage-1 optimizer steps")
    g.add_argument("--batch-size", type=count, default=d.batch_size, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=count, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the model weights")
    g.add_argument("--gate-lr", type=float, default=d.gate_lr, help="Adam learning rate of the gates' log_alpha")
    g.add_argument("--lagrangian-lr", type=float, default=d.lagrangian_lr,
                   help="learning rate of the multipliers lambda1, lambda2 (Adam, gradient ascent)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm of the weights (0: off)")
    g.add_argument("--freeze-weights", action="store_true",
                   help="masks-only calibration: train the gates, keep the model weights fixed")

    g = p.add_argument_group("stage 2 (continued training with the binary mask)")
    g.add_argument("--stage2-steps", type=count, default=d.stage2_steps,
                   help="weight-training steps with the binarised allocation fixed (needs --save-model)")
    g.add_argument("--save-model", default=None, type=path_arg, metavar="DIR",
                   help="write the trained model, with the allocation embedded for the vLLM plugin, to DIR")
    g.add_argument("--allocation", default=None, type=path_arg, metavar="FILE",
                   help="skip stage 1 and run only stage 2 with this fixed allocation (a rule-based one from "
                        "`consa-vllm make`, or one learned earlier); its granularity, window, sink and sparsity "
                        "replace --granularity, --window, --sink and --target-sparsity; needs --stage2-steps and "
                        "--save-model")

    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", default=d.out, type=path_arg, metavar="FILE.json", help="allocation file to write (JSON)")
    g.add_argument("--force", action="store_true",
                   help="start a new run even if --out or the log folder hold an earlier run's results: "
                        "they are replaced (without it such a run is refused)")
    g.add_argument("--log-dir", default=None, type=path_arg, metavar="DIR",
                   help="metrics.jsonl, checkpoints, plots (default: <out without .json>.logs next to --out)")
    g.add_argument("--checkpoint-every", type=count, default=d.checkpoint_every, help="steps between checkpoints (0: none)")
    g.add_argument("--keep-checkpoints", type=count, default=d.keep_checkpoints, help="how many recent checkpoints to keep")
    g.add_argument("--resume", nargs="?", const="auto", default=None, type=path_arg, metavar="CKPT",
                   help="resume from the latest checkpoint in --log-dir, or from the checkpoint directory given")
    g.add_argument("--seed", type=whole_number("a seed"), default=d.seed, help="seed of data order, gate noise and everything random")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (under torchrun: the local rank's GPU)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="model weights and compute dtype")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the processes with FSDP2 (for models that do not "
                        "fit one GPU) instead of replicating it with DDP; gates and multipliers stay replicated")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="turn the progress bar off (it is on by default)")
    return p


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (usage errors exit with status 2)."""
    ns = build_parser(prog).parse_args(argv)
    return TrainConfig(**vars(ns))


def validate(cfg: TrainConfig) -> None:
    """Check every value and path; raise :class:`ConfigError` naming the flag. Cheap: no torch."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    if cfg.method == "duo":  # first: a ConSA-only flag is the problem, whatever else it conflicts with
        _check_duo(cfg)
    need(cfg.method == "duo" or cfg.duo_l1 == TrainConfig().duo_l1, "--duo-l1 applies to --method duo only")
    need(0.0 <= cfg.target_sparsity <= 1.0, f"--target-sparsity must be in [0, 1], got {cfg.target_sparsity}")
    need(cfg.window >= 1, f"--window must be >= 1, got {cfg.window}")
    need(0 <= cfg.sink <= 2**31 - 1, f"--sink must be a whole number of tokens in 0..2147483647, got {cfg.sink}")
    need(abs(cfg.init_log_alpha) <= MAX_INIT_LOG_ALPHA,  # also refuses nan
         f"--init-log-alpha must be a number in [-{MAX_INIT_LOG_ALPHA:g}, {MAX_INIT_LOG_ALPHA:g}] (beyond it every "
         f"sampled gate is exactly 0 or 1 and the gates cannot learn), got {cfg.init_log_alpha:g}")
    need(cfg.seq_len >= 2, f"--seq-len must be >= 2, got {cfg.seq_len}")
    need(cfg.max_tokens is None or cfg.max_tokens >= cfg.seq_len,
         f"--max-tokens ({cfg.max_tokens}) must be at least --seq-len ({cfg.seq_len})")
    need(cfg.steps >= 1 or cfg.allocation is not None, f"--steps must be >= 1, got {cfg.steps}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    for flag, v in (("--lr", cfg.lr), ("--gate-lr", cfg.gate_lr), ("--lagrangian-lr", cfg.lagrangian_lr),
                    ("--grad-clip", cfg.grad_clip)):
        need(v >= 0 and v == v and v != float("inf"), f"{flag} must be a finite number >= 0, got {v}")
    need(cfg.gate_lr > 0, "--gate-lr must be > 0: the gates are what this trainer learns")
    need(0.0 <= cfg.target_warmup <= 1.0, f"--target-warmup is a fraction of --steps in [0, 1], got {cfg.target_warmup}")
    need(cfg.stage2_steps >= 0, f"--stage2-steps must be >= 0, got {cfg.stage2_steps}")
    need(cfg.stage2_steps == 0 or cfg.save_model, "--stage2-steps needs --save-model DIR to write the trained model")
    need(cfg.stage2_steps == 0 or cfg.lr > 0, "--stage2-steps trains the weights: --lr must be > 0")
    need(cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.constraint == "global" or cfg.granularity == "kv_head",
         "--constraint per-layer needs --granularity kv_head: with one gate per layer every layer is all F "
         "or all S, so a per-layer sparsity between 0 and 1 cannot be met; use --constraint global")
    need(cfg.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    problem = device_problem(cfg.device)  # imports torch only for a CUDA device
    need(problem is None, str(problem))

    # model directory
    model = Path(cfg.model)
    need(model.is_dir(), f"--model {cfg.model}: not a directory (expected a local Hugging Face checkpoint)")
    cfg_json = model / "config.json"
    need(cfg_json.is_file(), f"--model {cfg.model}: no config.json (is it a Hugging Face model directory?)")
    try:
        conf = json.loads(cfg_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--model {cfg_json}: not valid JSON ({e})") from None
    need(isinstance(conf, dict), f"--model {cfg_json}: expected a JSON object")
    from consa_vllm.allocation import ModelShape

    try:
        ModelShape.from_config(conf)  # every shape field a positive integer
    except ValueError as e:
        raise ConfigError(f"--model {cfg_json}: {e}") from None
    try:  # the family the reference attention patches (after the model loads, else)
        families.by_model_type(conf.get("model_type"), where=str(cfg_json))
    except families.UnsupportedFamilyError as e:
        raise ConfigError(f"--model {e}") from None
    max_pos = conf.get("max_position_embeddings")
    need(not isinstance(max_pos, int) or cfg.seq_len <= max_pos,
         f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {max_pos} ({cfg_json}): "
         f"positions beyond it were never trained; use --seq-len {max_pos} or less")
    tok = Path(cfg.tokenizer or cfg.model)
    need(tok.is_dir() and any((tok / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")),
         f"{'--tokenizer' if cfg.tokenizer else '--model'} {tok}: no tokenizer files (tokenizer.json, "
         "tokenizer.model or vocab.json); pass --tokenizer DIR")

    # data paths (contents are checked when the data is read, still before training)
    need(len(cfg.data) > 0, "--data: give at least one file or folder")
    for d in cfg.data:
        need(Path(d).exists(), f"--data {d}: no such file or directory")

    if cfg.allocation is not None:
        _use_fixed_allocation(cfg, conf)
    else:
        _check_reachable_sparsity(cfg, conf)
    if cfg.window >= cfg.seq_len:
        what = f"the window {cfg.window} of --allocation {cfg.allocation}" if cfg.allocation else f"--window {cfg.window}"
        raise ConfigError(
            f"{what} >= --seq-len {cfg.seq_len}: every training sequence fits in the window, so sliding-window "
            "attention equals full attention and training cannot tell F from S; use a window below --seq-len "
            "(or a longer --seq-len)")
    if cfg.sink and cfg.sink + cfg.window >= cfg.seq_len:  # S sees keys 0..sink-1 and i-W+1..i: all of them
        what = (f"the sink {cfg.sink} + window {cfg.window} of --allocation {cfg.allocation}" if cfg.allocation
                else f"--sink {cfg.sink} + --window {cfg.window}")
        raise ConfigError(
            f"{what} >= --seq-len {cfg.seq_len}: every query of a training sequence sees all its keys (the first "
            f"{cfg.sink} as sinks, the others in its window), so sink + window attention equals full attention and "
            "training cannot tell F from S; use a sink + window below --seq-len (or a longer --seq-len)")

    # outputs: checked now, so that nothing is lost after the training. None of them may be
    # an input, another output, or lie in a --data folder (the next run would train on it).
    inputs = [("--model", cfg.model), ("--tokenizer", cfg.tokenizer), *(("--data", d) for d in cfg.data),
              ("--allocation", cfg.allocation), ("--resume", None if cfg.resume == "auto" else cfg.resume)]
    data_folders = [("--data", d) for d in cfg.data]
    out = Path(cfg.out)
    problem = output_problem(out, "file", others=inputs, read_folders=data_folders)
    need(problem is None, f"--out {out}: {problem}")  # before log_path, which is made from its name
    log = cfg.log_path
    log_flag = "--log-dir" if cfg.log_dir else "--log-dir (default: next to --out)"
    problem = output_problem(log, "contents", others=[*inputs, ("--out", out)], read_folders=data_folders)
    need(problem is None, f"{log_flag} {log}: {problem}")
    real_out = Path(os.path.realpath(out))
    for a in RUN_ARTIFACTS:  # what the run writes in its log folder (and a --force run removes)
        spot = Path(os.path.realpath(log / a))
        need(real_out != spot and spot not in real_out.parents,
             f"--out {out}: is where the run writes its {a} ({log_flag} {log}); choose another path")
    need(not (cfg.force and cfg.resume), "--force starts a new run and --resume continues one: give only one")
    if not cfg.resume and not cfg.force:
        need(not out.exists(), f"--out {out}: already exists (an earlier run's allocation); pass --force to "
                               "replace it and that run's logs, or --resume to continue that run")
        earlier = [a for a in RUN_ARTIFACTS if (log / a).exists()]
        need(not earlier, f"{log_flag} {log}: holds an earlier run ({', '.join(earlier)}); pass --force to "
                          "replace it, or --resume to continue that run (runs are never mixed in one folder)")
    if cfg.save_model:
        sm = Path(cfg.save_model)
        need(not sm.exists() or (sm.is_dir() and not any(sm.iterdir())),
             f"--save-model {sm}: exists and is not an empty directory; choose a new one")
        need(sm.resolve() != model.resolve(), "--save-model must differ from --model (it would overwrite the source)")
        # The trained model replaces DIR at the very end: the run's own outputs must not be in it.
        for flag, path in (("--out", out), (log_flag, log)):
            inside = path.resolve() == sm.resolve() or sm.resolve() in path.resolve().parents
            need(not inside, f"--save-model {sm}: {flag} {path} is inside it, and the trained model replaces "
                             "that folder at the end; put them in different places")
        problem = output_problem(sm, "folder", others=inputs, read_folders=data_folders)
        need(problem is None, f"--save-model {sm}: {problem}")
    if cfg.resume and cfg.resume != "auto":
        r = Path(cfg.resume)
        need(r.is_dir() and (r / "state.json").is_file(),
             f"--resume {cfg.resume}: not a checkpoint directory (no state.json)")
    if cfg.resume:  # before the model loads: a truncated checkpoint is named, with the one to use instead
        from .checkpoint import (CheckpointError, explain_bad_checkpoint, latest_checkpoint, read_settings,
                                 verify_checkpoint)

        path = latest_checkpoint(log / "checkpoints") if cfg.resume == "auto" else Path(cfg.resume)
        if path is not None:
            try:
                verify_checkpoint(path)
                saved, fsdp, saved_world = read_settings(path)
            except CheckpointError as e:
                raise ConfigError(explain_bad_checkpoint(e, path)) from None
            # torchrun's WORLD_SIZE: the number of processes this run will have (Parallel reads the same).
            check_resume_settings(cfg, saved, fsdp, path, saved_world, int(os.environ.get("WORLD_SIZE", "1")))


def check_resume_settings(cfg: TrainConfig, saved: dict[str, Any], fsdp: bool, path: Path,
                          saved_world: int | None, world: int) -> None:
    """Refuse to continue the checkpoint ``path``, made with the settings ``saved`` (with or
    without ``fsdp``) on ``saved_world`` processes, under other settings on ``world``
    processes: the run would not reach the result it started for.

    The micro-batch ``m`` of step ``s`` on rank ``r`` takes the data and gate noise of global
    micro-batch ``(s * grad_accum + m) * world + r``, so a step covers the same ones whenever
    ``grad_accum x world`` is unchanged: that product is compared, not ``--grad-accum`` alone.
    A checkpoint written before the world size was recorded (``saved_world`` None) cannot
    tell, and must be resumed with its own ``--grad-accum``.
    """
    if fsdp != cfg.fsdp:  # optimizer states are keyed differently
        raise ConfigError(f"--resume {path}: the checkpoint was made {'with' if fsdp else 'without'} --fsdp; "
                          f"resume {'with' if fsdp else 'without'} it")
    # A setting the checkpoint does not record (it predates the flag, e.g. --sink) had its default.
    old = {**TrainConfig().to_dict(), **saved}
    diffs = [k for k, v in cfg.to_dict().items()
             if k not in RESUME_FREE_FIELDS and (k != "grad_accum" or saved_world is None) and old.get(k) != v]
    if diffs:
        raise ConfigError(f"--resume {path}: the checkpoint was made with different settings: " + ", ".join(
            f"--{k.replace('_', '-')} {old.get(k)!r} (now {getattr(cfg, k)!r})" for k in diffs))
    if saved_world is None:
        return
    per_step, now = old["grad_accum"] * saved_world, cfg.grad_accum * world
    if per_step != now:
        fix = (f"resume with --grad-accum {per_step // world} on {world} process{'es' if world > 1 else ''}"
               if per_step % world == 0 else
               f"resume on a number of processes (torchrun --nproc-per-node) that divides {per_step}")
        raise ConfigError(
            f"--resume {path}: the checkpoint was made with --grad-accum {old['grad_accum']} on {saved_world} "
            f"process{'es' if saved_world > 1 else ''} (torchrun --nproc-per-node), {per_step} micro-batches per "
            f"step; now --grad-accum {cfg.grad_accum} on {world}, {now}: the steps would see other data and gate "
            f"noise; {fix}")


def _use_fixed_allocation(cfg: TrainConfig, model_config: dict) -> None:
    """``--allocation``: check the file against the model, then take its method settings.

    Stage 1 is skipped (``steps`` becomes 0), so the gate settings do not matter; the
    window, sink and granularity must be the file's, or stage 2 would train another model
    than the one the allocation describes and the plugin serves.
    """
    from consa_vllm.allocation import Allocation, AllocationError, ModelShape

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.stage2_steps >= 1, "--allocation runs stage 2 only: give --stage2-steps N (N >= 1)")
    need(not cfg.freeze_weights, "--allocation trains the weights (stage 2); --freeze-weights would leave "
                                 "nothing to train")
    try:
        alloc = Allocation.load(cfg.allocation)
        shape = ModelShape.from_config(model_config)
        alloc.check_model(shape.num_layers, shape.num_kv_heads, source=cfg.allocation)
    except AllocationError as e:
        raise ConfigError(f"--allocation: {e}") from None
    cfg.granularity, cfg.window, cfg.sink, cfg.target_sparsity, cfg.steps = (
        alloc.granularity, alloc.window, alloc.sink, alloc.sparsity, 0)


def _check_reachable_sparsity(cfg: TrainConfig, model_config: dict) -> None:
    """Refuse a --target-sparsity that the unit count cannot hit exactly (as ``consa-vllm make`` does).

    The trainer binarises to exactly round(rho * units) S units; a rho between two reachable
    values would be rounded to one of them silently (0.75 of 2 heads per layer is all-S).
    """
    from consa_vllm.allocation import ModelShape
    from consa_vllm.allocation.rules import nearest_exact

    shape = ModelShape.from_config(model_config)
    if cfg.granularity == "layer":
        units, what = shape.num_layers, "layers"
    elif cfg.constraint == "per-layer":
        units, what = shape.num_kv_heads, "KV heads per layer (--constraint per-layer)"
    else:
        units, what = shape.num_layers * shape.num_kv_heads, "KV heads in all"
    near = nearest_exact(cfg.target_sparsity, units)  # consa-vllm make's test
    if near is not None:
        raise ConfigError(
            f"--target-sparsity {cfg.target_sparsity} cannot be reached with {units} {what}: it needs "
            f"{cfg.target_sparsity * units:g} S units; nearest reachable values: {near[0]:.6g} or {near[1]:.6g}")


#: Flags that mean nothing to ``--method duo`` (it has no L0 gates, no Lagrangian, trains no weights,
#: runs in one process and is not checkpointed): given with another value than the default, refused.
DUO_REFUSED = {"init_log_alpha": "--init-log-alpha", "target_warmup": "--target-warmup",
               "lagrangian_lr": "--lagrangian-lr", "lr": "--lr", "grad_clip": "--grad-clip",
               "stage2_steps": "--stage2-steps", "save_model": "--save-model", "allocation": "--allocation",
               "resume": "--resume", "fsdp": "--fsdp", "granularity": "--granularity"}


def _check_duo(cfg: TrainConfig) -> None:
    """``--method duo``: refuse, in one line, every flag that belongs to the ConSA method only."""
    default = TrainConfig()
    given = [flag for name, flag in DUO_REFUSED.items() if getattr(cfg, name) != getattr(default, name)]
    if given:
        raise ConfigError(f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --method duo "
                          "(one [0, 1] gate per KV head, weights frozen, no Lagrangian, no stage 2, one process)")
    if not (cfg.duo_l1 >= 0 and cfg.duo_l1 != float("inf")):
        raise ConfigError(f"--duo-l1 must be a finite number >= 0, got {cfg.duo_l1}")
    # The needles start after the sink, and each query ends a window after its needle ends.
    if cfg.seq_len < cfg.sink + 2 * cfg.window + 16:
        need, beyond = ("--sink + 2 x --window + 16", "the sink and the window") if cfg.sink else \
            ("2 x --window + 16", "the window")
        raise ConfigError(f"--method duo: --seq-len ({cfg.seq_len}) must be at least {need} "
                          f"({cfg.sink + 2 * cfg.window + 16}) so that its passkey needles can lie beyond {beyond}")
