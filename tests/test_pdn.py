"""PDN backbones: architecture, EfficientAD state dicts, shipped weights, bad files, distillation."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fdseg import FewShotSegmenter, InputError, create_backbone
from fdseg.backbones.pdn import PDN, PUBLISHED_PARAMS, shipped_weights_path
from fdseg.cli import main
from fdseg.distill import DistillConfig, distill


def _efficientad_small() -> nn.Sequential:
    """EfficientAD's get_pdn_small(384, padding=True), written out independently."""
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(128, 256, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 384, 4))


def _efficientad_medium() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(256, 512, 4, padding=3), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=1),
        nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 384, 4), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 1))


def test_tiny_variant_is_a_pdn_at_a_tenth_of_the_cost():
    tiny = PDN("pdn_tiny")
    assert sum(p.numel() for p in tiny.parameters()) == 252_064   # 32/64/64/128/384 ch, our own variant
    with torch.inference_mode():
        assert tuple(tiny(torch.zeros(1, 3, 256, 256))[0].shape) == (1, 384, 64, 64)


@pytest.mark.parametrize("arch", ["pdn_small", "pdn_medium"])
def test_parameter_counts_match_published(arch):
    m = PDN(arch)
    assert sum(p.numel() for p in m.parameters()) == PUBLISHED_PARAMS[arch]
    assert PUBLISHED_PARAMS == {"pdn_small": 2_694_144, "pdn_medium": 8_026_624}
    ref = _efficientad_small() if arch == "pdn_small" else _efficientad_medium()
    assert [(k, tuple(v.shape)) for k, v in m.net.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]


def test_output_shapes():
    small = PDN("pdn_small")
    with torch.inference_mode():
        assert tuple(small(torch.zeros(1, 3, 256, 256))[0].shape) == (1, 384, 64, 64)
        assert tuple(small(torch.zeros(2, 3, 96, 160))[0].shape) == (2, 384, 24, 40)
        assert tuple(PDN("pdn_medium")(torch.zeros(1, 3, 64, 64))[0].shape) == (1, 384, 16, 16)
    assert small.strides == (4,) and small.channels == (384,)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_efficientad_state_dict_loads_and_round_trips(tmp_path, prefix):
    torch.manual_seed(0)
    ref = _efficientad_small().eval()
    path = tmp_path / "teacher_small.pth"
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)
    bb = create_backbone("pdn_small", weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(bb(x)[0], ref(x))       # no output statistics in the file: raw output
    # saving the loaded backbone's network and loading it again gives the same tensors
    again = tmp_path / "again.pth"
    torch.save(bb.net.state_dict(), again)
    bb2 = create_backbone("pdn_small", weights=again)
    assert all(torch.equal(a, b) for a, b in zip(bb.net.state_dict().values(), bb2.net.state_dict().values()))


def test_bad_weight_files(tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        create_backbone("pdn_small", weights=tmp_path / "missing.pth")
    assert "missing.pth" in str(e.value)
    medium = tmp_path / "teacher_medium.pth"
    torch.save(_efficientad_medium().state_dict(), medium)
    with pytest.raises(InputError, match="shape mismatch") as e:         # wrong architecture
        create_backbone("pdn_small", weights=medium)
    assert "teacher_medium.pth" in str(e.value) and "not pdn_small weights" in str(e.value)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(shipped_weights_path("pdn_tiny").read_bytes()[:100_000])
    with pytest.raises(InputError, match="corrupt") as e:
        create_backbone("pdn_small", weights=corrupt)
    assert "corrupt.pth" in str(e.value)
    pickled = tmp_path / "whole_model.pth"
    torch.save(_efficientad_small(), pickled)        # a pickled module, not a state dict
    with pytest.raises(InputError, match="not a plain state dict") as e:
        create_backbone("pdn_small", weights=pickled)
    assert "whole_model.pth" in str(e.value)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(print))            # arbitrary pickle: refused by weights_only=True
    with pytest.raises(InputError, match="not a plain state dict"):
        create_backbone("pdn_small", weights=evil)
    for arch in ("pdn_small", "pdn_medium"):
        with pytest.raises(InputError, match="ships no weights"):
            create_backbone(arch)
    tiny_file = tmp_path / "tiny.pth"                   # a pdn_tiny student is not pdn_small weights
    torch.save(PDN("pdn_tiny").net.state_dict(), tiny_file)
    with pytest.raises(InputError, match="not pdn_small weights"):
        create_backbone("pdn_small", weights=tiny_file)


def test_shipped_weights_load_by_default():
    path = shipped_weights_path("pdn_tiny")
    assert path.is_file() and path.stat().st_size < 1_000_000        # fp16
    bb = create_backbone("pdn_tiny")
    assert bb.net[0].weight.dtype == torch.float32
    assert not torch.equal(bb.out_std, torch.ones_like(bb.out_std))   # the file's output statistics
    untrained = create_backbone("pdn_tiny", weights="random")
    assert not torch.equal(bb.net[0].weight, untrained.net[0].weight)


@pytest.mark.data
@pytest.mark.slow
def test_shipped_student_fm_beats_trivial_baselines(defects_root):
    from fdseg.bench import run_episode
    from fdseg.data import make_episodes, scan
    from fdseg.metrics import benchmark_mean, dataset_scores, episode_counts
    cat = scan(defects_root).subset(["sd_saliency_900", "magnetic_tile"], None, 3)
    eps = make_episodes(cat, 1, seed=2)
    seg = FewShotSegmenter(backbone="pdn_tiny", method="fm")
    recs = {k: [] for k in ("fm", "all_fg", "all_bg")}
    for ep in eps:
        gt, pred, _, _ = run_episode(seg, cat.root, ep, 256)
        for k, p in (("fm", pred), ("all_fg", np.ones_like(gt)), ("all_bg", np.zeros_like(gt))):
            tp, fp, fn, tn = episode_counts(gt, p)
            recs[k].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    miou = {}
    for k, rs in recs.items():
        by = {}
        for r in rs:
            by.setdefault(r["dataset"], []).append(r)
        miou[k] = benchmark_mean([dataset_scores(d, sorted(cat.classes[d]), v) for d, v in by.items()])[
            "class_mean_miou"]
    print("pdn_tiny fm vs trivial, class-mean mIoU:", miou)
    assert len(eps) >= 20
    # measured with the shipped student: fm 0.244, all-foreground 0.083, all-background 0.0
    assert miou["fm"] > max(miou["all_fg"], miou["all_bg"]) + 0.05, miou


def _cfg(images, out, **kw):
    base = dict(data=str(images), out=str(out), max_images=6, crop=32, batch=4, size=128,
                stats_images=6, minutes=5, progress=False, lr=1e-3, seed=3, arch="pdn_tiny")
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def demo_images(demo):
    """The demo's 8 query images (6 grey blowhole tiles, 2 defect-free RGB tiles) as a distillation set."""
    return demo.queries[0][0].parent


@pytest.mark.data
@pytest.mark.slow
def test_short_distillation_reduces_loss(distill_root, tmp_path):
    # whole 64 x 64 images (crop = size), no augmentation: the probe crops are the training crops
    r = distill(_cfg(distill_root / "images", tmp_path / "a", max_steps=40, probe_every=20, size=64, crop=64,
                     max_images=2, batch=4, stats_images=2, gray_p=0.0, flip=False))
    assert r.steps == 40
    # the standardised target has unit variance: the untrained student's probe loss is near 1;
    # 40 Adam steps bring it down measurably (see the assertion message for the history)
    assert r.probe_loss_start > 0.8
    assert r.probe_loss_end < 0.8 * r.probe_loss_start, r.history
    assert r.history[1]["probe_loss"] < r.probe_loss_start
    bb = create_backbone("pdn_tiny", weights=r.student_file)      # the exported student loads
    with torch.inference_mode():
        assert tuple(bb(torch.zeros(1, 3, 64, 64))[0].shape) == (1, 384, 16, 16)


def test_resume_continues_exactly(demo_images, tmp_path):
    straight = distill(_cfg(demo_images, tmp_path / "s", max_steps=6))
    cfg = _cfg(demo_images, tmp_path / "r", max_steps=3)
    distill(cfg)
    with pytest.raises(InputError, match="--resume"):
        distill(cfg)                                  # a checkpoint is there: refuse to overwrite
    with pytest.raises(InputError, match="other settings.*lr"):
        distill(_cfg(demo_images, tmp_path / "r", max_steps=6, lr=5e-4), resume=True)
    resumed = distill(_cfg(demo_images, tmp_path / "r", max_steps=6), resume=True)
    assert resumed.steps == 6
    a = torch.load(straight.student_file, weights_only=True)
    b = torch.load(resumed.student_file, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_keeps_its_checkpoint_and_resumes_exactly(demo_images, tmp_path, monkeypatch):
    import fdseg.distill as D
    straight = distill(_cfg(demo_images, tmp_path / "s", max_steps=6))
    real_crops, calls = D.crops, {"n": 0}

    def crops_then_ctrl_c(*a, **kw):       # call 1 is the probe batch, call k + 1 is step k
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_crops(*a, **kw)

    monkeypatch.setattr(D, "crops", crops_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(demo_images, tmp_path / "i", max_steps=6))
    monkeypatch.setattr(D, "crops", real_crops)
    ck = torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=True)
    assert int(ck["step"]) == 3                          # the 3 finished steps were saved on the way out
    resumed = distill(_cfg(demo_images, tmp_path / "i", max_steps=6), resume=True)
    assert resumed.steps == 6
    a = torch.load(straight.student_file, weights_only=True)
    b = torch.load(resumed.student_file, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_cli_and_errors(demo_images, tmp_path, capsys):
    with pytest.raises(InputError, match="holds no image files"):
        distill(_cfg(demo_images, tmp_path / "x", data=str(tmp_path)))
    with pytest.raises(InputError, match="multiple of 4"):
        distill(_cfg(demo_images, tmp_path / "x", crop=30))
    with pytest.raises(InputError, match="must divide --batch"):
        distill(_cfg(demo_images, tmp_path / "x", batch=6, crops_per_image=4))
    rc = main(["distill", "--data", str(demo_images), "--out", str(tmp_path / "c"),
               "--max-images", "4", "--max-steps", "2", "--crop", "32", "--batch", "4", "--size", "64",
               "--no-progress"])
    assert rc == 0
    assert "2 steps" in capsys.readouterr().out
    rec = json.loads((tmp_path / "c" / "train.json").read_text())
    assert rec["result"]["steps"] == 2 and rec["result"]["images"] == 4 and rec["config"]["crop"] == 32
    assert rec["config"]["arch"] == "pdn_small"                              # the CLI's default student
    bb = create_backbone("pdn_small", weights=tmp_path / "c" / "student.pt")    # and it loads
    with torch.inference_mode():
        assert tuple(bb(torch.zeros(1, 3, 64, 64))[0].shape) == (1, 384, 16, 16)


def test_segment_cli_with_shipped_pdn(demo, tmp_path):
    (s_img, s_mask), (q, gt) = demo.supports[0], demo.queries[5]      # exp1_num_317483
    out = tmp_path / "o"
    rc = main(["segment", "--support", str(s_img), str(s_mask), "--query", str(q),
               "--out", str(out), "--backbone", "pdn_tiny", "--no-progress", "--preset", "fast"])
    assert rc == 0
    from PIL import Image
    from conftest import iou
    mask = np.array(Image.open(out / "masks" / f"{q.stem}.png"))
    assert mask.shape == np.array(Image.open(q)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    # the student finds this blowhole: IoU with the ground truth measured 0.66
    assert iou(mask > 0, np.array(Image.open(gt)) > 0) > 0.4
