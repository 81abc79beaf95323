"""The trainer on a tiny model (CPU): convergence to the target, exact binarisation, resume, NaN, stage 2."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from consa_vllm.allocation import Allocation
from consa_vllm.tiny import stdlib_python_files
from consa_vllm.train import ConfigError, TrainConfig, train, validate
from consa_vllm.train import loop as loop_mod
from consa_vllm.train.data import DataError, PackedData, load_data

torch.set_num_threads(1)  # the CI box has 2 shared cores: oversubscription only slows things down


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("train")
    model = tiny_model("qwen3", num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32, hidden_size=128,
                       intermediate_size=256)
    data = root / "data"
    data.mkdir()
    for f in stdlib_python_files(12):
        shutil.copy(f, data / (f.stem + ".txt"))
    return root, model, data


def cfg_for(tiny, tmp_path, **kw) -> TrainConfig:
    _, model, data = tiny
    base = dict(model=str(model), data=[str(data)], seq_len=64, window=16, steps=200, batch_size=2,
                freeze_weights=True, target_sparsity=0.5, out=str(tmp_path / "alloc.json"),
                checkpoint_every=0, progress=False)
    base.update(kw)
    cfg = TrainConfig(**base)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("granularity,constraint", [("layer", "global"), ("kv_head", "global"),
                                                    ("kv_head", "per-layer")])
def test_reaches_target_and_binarises_exactly(tiny, tmp_path, granularity, constraint):
    cfg = cfg_for(tiny, tmp_path, granularity=granularity, constraint=constraint)
    alloc = train(cfg)
    hist = [json.loads(l) for l in (cfg.log_path / "metrics.jsonl").read_text().splitlines()]
    last = hist[-1]
    assert len(hist) == 200 and last["target"] == 0.5
    assert abs(last["expected_sparsity"] - 0.5) < 0.02, last
    if constraint == "per-layer":
        assert max(abs(s - 0.5) for s in last["expected_sparsity_per_layer"]) < 0.02, last
    # binarisation: exact, per layer under per-layer
    saved = Allocation.load(cfg.out)
    assert saved.pattern == alloc.pattern and saved.granularity == granularity
    assert saved.sparsity == 0.5 and saved.achieved_sparsity == 0.5
    if constraint == "per-layer":
        assert all(row.count("S") == 2 for row in saved.pattern)
    t = saved.training
    assert t["stage1_steps"] == 200 and t["args"]["constraint"] == constraint
    assert len(t["log_alpha"]) == 4 and len(t["log_alpha"][0]) == (1 if granularity == "layer" else 4)
    assert set(t["final"]) >= {"loss", "penalty", "lambda1", "lambda2", "expected_sparsity"}
    for png in ("allocation.png", "curves.png"):
        assert (cfg.log_path / png).read_bytes()[:4] == b"\x89PNG"


def test_per_layer_needs_kv_head(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--constraint per-layer needs --granularity kv_head"):
        cfg_for(tiny, tmp_path, granularity="layer", constraint="per-layer")


def test_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    kw = dict(steps=30, freeze_weights=False, lr=1e-3, checkpoint_every=10, constraint="per-layer")
    ref = train(cfg_for(tiny, tmp_path / "a", **kw))

    real_step = loop_mod.Trainer.train_step

    def killed_at_25(self, *a, **k):
        if self.step == 25:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    cfg = cfg_for(tiny, tmp_path / "b", **kw)
    monkeypatch.setattr(loop_mod.Trainer, "train_step", killed_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert not (tmp_path / "b" / "alloc.json").exists()
    monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)
    resumed = train(replace(cfg, resume="auto"))  # restarts from step 20

    assert resumed.pattern == ref.pattern
    assert resumed.training["log_alpha"] == ref.training["log_alpha"]  # bitwise, as floats
    assert resumed.training["final"] == ref.training["final"]
    hist = [json.loads(l) for l in (cfg.log_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in hist] == list(range(30))
    ref_hist = [json.loads(l) for l in (tmp_path / "a" / "alloc.logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref_hist]


def test_resume_refuses_changed_settings(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path, steps=4, checkpoint_every=2)
    train(cfg)
    with pytest.raises(ConfigError, match="--gate-lr"):
        train(replace(cfg, resume="auto", gate_lr=0.5))


def test_resume_compares_grad_accum_times_processes(tiny, tmp_path, monkeypatch):
    """Global micro-batch (step * accum + m) * world + rank picks the data and the gate noise, so a
    checkpoint resumes on another number of processes exactly where accum x world is unchanged."""
    from consa_vllm.train.checkpoint import latest_checkpoint, read_settings
    from consa_vllm.train.config import check_resume_settings

    cfg = cfg_for(tiny, tmp_path, steps=4, checkpoint_every=2, grad_accum=2)
    train(cfg)
    saved, fsdp, world = read_settings(latest_checkpoint(cfg.log_path / "checkpoints"))
    assert world == 1 and not fsdp and saved["grad_accum"] == 2
    # world 1 x accum 2 == world 2 x accum 1: accepted (validate reads torchrun's WORLD_SIZE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(replace(cfg, resume="auto", grad_accum=1))
    with pytest.raises(ConfigError) as e:  # 2 x 2 micro-batches per step instead of 2
        validate(replace(cfg, resume="auto"))
    msg = str(e.value)
    assert "--grad-accum 2 on 1 process" in msg and "--nproc-per-node" in msg and "now --grad-accum 2 on 2" in msg
    assert msg.endswith("resume with --grad-accum 1 on 2 processes")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="--grad-accum 2 on 1 process.*now --grad-accum 1 on 1"):
        validate(replace(cfg, resume="auto", grad_accum=1))

    # The comparison itself: accum 4 on 2 processes == 8 micro-batches a step.
    run = replace(cfg, grad_accum=4)
    for accum, world in ((8, 1), (2, 4), (1, 8)):
        check_resume_settings(replace(run, grad_accum=accum), run.to_dict(), False, tmp_path, 2, world)
    with pytest.raises(ConfigError, match="resume on a number of processes .* that divides 8"):
        check_resume_settings(replace(run, grad_accum=1), run.to_dict(), False, tmp_path, 2, 3)
    # A checkpoint from before the world size was recorded: its --grad-accum, exactly, as before.
    check_resume_settings(run, run.to_dict(), False, tmp_path, None, 2)
    with pytest.raises(ConfigError, match=r"different settings: --grad-accum 4 \(now 8\)"):
        check_resume_settings(replace(run, grad_accum=8), run.to_dict(), False, tmp_path, None, 1)


def test_metrics_record_the_state_before_the_optimizer_step(tiny, tmp_path):
    """Each metrics record describes the parameters its step's forward passes used: the
    multipliers and the expected sparsity (global and per layer) are read before the update,
    as the loss and the penalty can only be, so the penalty follows from the record's own values."""
    from consa_vllm.train.gates import BETA, LOG_RATIO

    cfg = cfg_for(tiny, tmp_path, steps=6, constraint="per-layer", lagrangian_lr=0.5)
    train(cfg)
    hist = [json.loads(l) for l in cfg.log_path.joinpath("metrics.jsonl").read_text().splitlines()]
    first = hist[0]
    assert first["lambda1"] == [0.0] * 4 and first["lambda2"] == [0.0] * 4  # the multipliers start at 0
    at_init = 1 - torch.sigmoid(torch.tensor(cfg.init_log_alpha - BETA * LOG_RATIO)).item()
    assert first["expected_sparsity"] == pytest.approx(at_init, rel=1e-4)  # float32; one step moves it ~10%
    for r in hist:
        per_layer = r["expected_sparsity_per_layer"]
        assert sum(per_layer) / len(per_layer) == pytest.approx(r["expected_sparsity"], rel=1e-5, abs=1e-7)
        gaps = [s - r["target"] for s in per_layer]
        penalty = sum(l1 * g + l2 * g * g for l1, l2, g in zip(r["lambda1"], r["lambda2"], gaps))
        assert r["penalty"] == pytest.approx(penalty, rel=1e-4, abs=1e-7), r
    assert any(r["lambda1"] != [0.0] * 4 for r in hist[1:])  # the multipliers did move


def test_interrupted_checkpoint_writes_are_recovered_on_resume(tmp_path, monkeypatch):
    """A re-write killed between its two renames leaves the old checkpoint moved aside
    (.old-step_*): it is put back; a leftover beside its checkpoint and unfinished writes
    (.tmp-step_*) are removed. Every rename is followed by an fsync of the folder."""
    from consa_vllm.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    synced = []
    monkeypatch.setattr(ckpt, "fsync_dir", lambda path: synced.append(Path(path)))
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, {"x": torch.full((2,), float(step))})
    assert synced.count(root) >= 4 and (root / "step_00000002").exists()
    # Killed between the renames of a re-write of step 2, and one leftover beside step 1.
    (root / "step_00000002").rename(root / ".old-step_00000002")
    (root / ".tmp-step_00000002").mkdir()
    (root / ".tmp-step_00000002" / "state.json").write_text("{")
    shutil.copytree(root / "step_00000001", root / ".old-step_00000001")
    assert ckpt.latest_checkpoint(root).name == "step_00000001"  # step 2 missing: the older one
    notes = ckpt.recover_interrupted_writes(root)
    assert len(notes) == 3 and any("restored" in n and "step_00000002" in n for n in notes)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
    assert ckpt.load_checkpoint(root / "step_00000002")[1]["x"].tolist() == [2.0, 2.0]
    assert ckpt.recover_interrupted_writes(root) == []
    # A completed re-write (after a resume from step 1) leaves no .old-step_* behind.
    ckpt.save_checkpoint(root, 2, {"x": torch.full((2,), 20.0)})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert ckpt.load_checkpoint(root / "step_00000002")[1]["x"].tolist() == [20.0, 20.0]


def test_trainer_resume_puts_a_moved_aside_checkpoint_back(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path, steps=4, checkpoint_every=2)
    train(cfg)
    root = cfg.log_path / "checkpoints"
    (root / "step_00000004").rename(root / ".old-step_00000004")
    resumed = train(replace(cfg, resume="auto"))
    assert resumed.training["stage1_steps"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    hist = [json.loads(l) for l in cfg.log_path.joinpath("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in hist] == [0, 1, 2, 3]  # resumed at step 4: nothing left to train


def test_nan_stops_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch):
    cfg = cfg_for(tiny, tmp_path, steps=20, checkpoint_every=5)
    real_noise = loop_mod.noise
    monkeypatch.setattr(loop_mod, "noise", lambda seed, g, shape: real_noise(seed, g, shape) * (
        float("nan") if g >= 12 else 1.0))
    with pytest.raises(loop_mod.TrainingDiverged, match=r"loss became nan at step 12.*step_00000010"):
        train(cfg)
    ckpts = sorted(p.name for p in (cfg.log_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000005", "step_00000010"]
    assert not (tmp_path / "alloc.json").exists()


def test_stage2_saves_exported_model(tiny, tmp_path):
    from consa_vllm.export import read_exported_allocation
    from safetensors.torch import load_file
    _, model_dir, _ = tiny
    out_model = tmp_path / "trained"
    cfg = cfg_for(tiny, tmp_path, steps=20, stage2_steps=5, lr=1e-3, save_model=str(out_model),
                  checkpoint_every=0)
    alloc = train(cfg)
    conf = json.loads((out_model / "config.json").read_text())
    assert conf["architectures"] == ["ConsaQwen3ForCausalLM"]
    assert read_exported_allocation(out_model).pattern == alloc.pattern
    assert (out_model / "tokenizer.json").is_file()
    new, old = load_file(str(out_model / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert set(new) == set(old)
    assert any(not torch.equal(new[k], old[k]) for k in old)  # stage 2 trained the weights
    stages = [json.loads(l)["stage"] for l in (cfg.log_path / "metrics.jsonl").read_text().splitlines()]
    assert stages == [1] * 20 + [2] * 5
    assert Allocation.load(cfg.out).training["final_stage2"]["loss"] > 0


# ------------------------------------------------------------------------------------ data


def test_data_formats_and_order(tiny, tmp_path):
    from transformers import AutoTokenizer
    _, model_dir, data = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [p.read_text() for p in sorted(data.glob("*.txt"))][:4]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    packs = [load_data([str(tmp_path / p)], tok, 64, seed=0).sequences
             for p in ("d.jsonl", "d.parquet", "ds", "txt")]
    assert all(torch.equal(packs[0], p) for p in packs[1:]) and packs[0].shape[1] == 64

    d = PackedData(packs[0], seed=3)
    # 2 ranks x accum 1 see exactly what 1 rank x accum 2 sees, in the same order
    one = [d.micro_batch(5, m, 2, 2) for m in range(2)]
    two = [d.micro_batch(5, 0, 1, 2, rank=r, world=2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(d.micro_batch(7, 0, 1, 4), PackedData(packs[0], seed=3).micro_batch(7, 0, 1, 4))
    assert not torch.equal(d.micro_batch(7, 0, 1, 4), PackedData(packs[0], seed=4).micro_batch(7, 0, 1, 4))


def test_bad_data_messages(tiny, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny[1])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_data([str(tmp_path / "bad.jsonl")], tok, 64, 0)
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"line 1 has no string field 'text'"):
        load_data([str(tmp_path / "nofield.jsonl")], tok, 64, 0)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match=r"bin.txt: not UTF-8"):
        load_data([str(tmp_path / "bin.txt")], tok, 64, 0)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="not enough text for one sequence"):
        load_data([str(tmp_path / "short.txt")], tok, 64, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder has no readable data files"):
        load_data([str(tmp_path / "empty")], tok, 64, 0)


def test_saved_dataset_folders_are_recognised_precisely(tmp_path):
    """A folder reads as a ``datasets`` folder exactly when ``datasets.load_from_disk`` would take it;
    a trainer checkpoint folder (it has a state.json too) is an ordinary folder of files."""
    import datasets

    from consa_vllm.train.checkpoint import save_checkpoint
    from consa_vllm.train.data import list_sources

    one = datasets.Dataset.from_dict({"text": ["a b c"]})
    one.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": one}).save_to_disk(str(tmp_path / "dd"))
    assert list_sources([str(tmp_path / "ds")]) == [("datasets", tmp_path / "ds")]
    assert list_sources([str(tmp_path / "dd")]) == [("datasets", tmp_path / "dd")]
    ckpt = save_checkpoint(tmp_path / "checkpoints", 10, {"log_alpha": torch.zeros(2)})
    assert (ckpt / "state.json").is_file()
    assert list_sources([str(ckpt)]) == [("jsonl", ckpt / "state.json")]


def test_run_heatmap_is_the_allocation_heatmap_with_the_gate_probabilities(tmp_path):
    """The trainer draws its allocation.png with the package's one heatmap; the recorded P(F)
    (one gate per layer under layer granularity) fill its second panel."""
    from consa_vllm.allocation import plot_allocation
    from consa_vllm.train.plots import gate_probabilities

    layer = Allocation(granularity="layer", window=8, pattern=["FF", "SS"]).with_extra(
        training={"p_nonzero": [[0.9], [0.2]]})
    assert gate_probabilities(layer) == [[0.9, 0.9], [0.2, 0.2]]
    heads = Allocation(granularity="kv_head", window=8, pattern=["FS", "SF"]).with_extra(
        training={"p_nonzero": [[0.7, 0.1], [0.3, 0.6]]})
    assert gate_probabilities(heads) == [[0.7, 0.1], [0.3, 0.6]]
    assert gate_probabilities(Allocation(granularity="layer", window=8, pattern=["F", "S"])) is None
    # The probabilities are accepted by the heatmap (it checks their shape and range).
    png = plot_allocation(layer, tmp_path / "a.png", probabilities=gate_probabilities(layer))
    assert png.read_bytes()[:4] == b"\x89PNG"
