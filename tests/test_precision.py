"""The numeric path (fp32 / bf16): chosen by the hardware or forced, named in the plan and the CLI, and
the two paths' masks close on real images (the gap itself: BENCHMARKS.md, *Precision*)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fdseg import FewShotSegmenter, InputError
from fdseg.hardware import PRECISION_ENV, fast_bf16, precision_setting, resolve_precision

from conftest import planted


def test_precision_setting_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert precision_setting() == "auto" and precision_setting("FP32") == "fp32"
    assert resolve_precision("fp32") == ("fp32", "precision=fp32")
    path, why = resolve_precision()
    assert path == ("bf16" if fast_bf16("cpu") else "fp32") and why.startswith("auto: ")
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision()[0] == "bf16" and resolve_precision()[1].startswith(f"{PRECISION_ENV}=bf16")
    assert resolve_precision("fp32")[0] == "fp32"           # the argument wins over the environment
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(InputError, match=f"{PRECISION_ENV}: choose auto, fp32 or bf16, got 'half'"):
        resolve_precision()
    with pytest.raises(InputError, match="precision: choose auto, fp32 or bf16"):
        FewShotSegmenter(precision="fp16")


@pytest.mark.parametrize("path", ["fp32", "bf16"])
def test_the_path_drives_the_backbone_and_the_matching_and_the_plan_names_it(path):
    img, mask = planted(128, 128, (40, 40, 80, 80), seed=3)
    seg = FewShotSegmenter(preset="fast", precision=path).fit([img], [mask])
    assert seg.settings["precision"] == path
    assert seg.extractor.amp == (path == "bf16")
    assert seg.method.dtype == (torch.bfloat16 if path == "bf16" else torch.float32)
    # a forced bf16 where the CPU has no fast bf16 adds "(slow where the hardware has no fast bf16)"
    assert seg.plan["precision"] == path and str(seg.plan).splitlines()[0].startswith(
        f"precision={path} because precision={path}")
    assert seg.describe()["plan"]["precision"] == path
    # the matcher's own option still sets the matching alone
    mixed = FewShotSegmenter(preset="fast", precision=path, method_options={"precision": "fp32"}).fit([img], [mask])
    assert mixed.method.dtype == torch.float32 and mixed.extractor.amp == (path == "bf16")


def test_cli_explain_names_the_path_forced_by_the_environment(tmp_path, demo):
    (s_img, s_mask), (q, _) = demo.supports[0], demo.queries[0]
    env = {**__import__("os").environ, PRECISION_ENV: "fp32"}
    r = subprocess.run([sys.executable, "-m", "fdseg", "segment", "--explain", "--no-progress", "--preset", "fast",
                        "--support", str(s_img), str(s_mask), "--query", str(q), "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert f"precision=fp32 because {PRECISION_ENV}=fp32" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fdseg", "segment", "--no-progress", "--precision", "fp16",
                        "--support", str(s_img), str(s_mask), "--query", str(q), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "invalid choice: 'fp16'" in r.stderr


@pytest.mark.data
def test_the_two_paths_give_close_masks_on_real_images(defects_root):
    """Measured (Zen 4, 4 queries): 99.985-100 % of the pixels equal; the margins differ by 0.008-0.011 (median
    cell), up to 0.12 (the bf16 backbone's rounding, through the linear head); defect scores by up to 0.039."""
    torch.set_num_threads(1)
    cls = defects_root / "magnetic_tile" / "blowhole"
    ims = sorted((cls / "images").iterdir())[:6]
    sup, masks, queries = ims[:2], [cls / "masks" / f"{p.stem}.png" for p in ims[:2]], ims[2:]
    preds = {p: FewShotSegmenter(preset="fast", precision=p).fit(sup, masks).predict(queries) for p in ("fp32", "bf16")}
    for a, b in zip(preds["fp32"], preds["bf16"]):
        d = np.abs(a.margin_grid - b.margin_grid)
        assert (a.mask == b.mask).mean() > 0.999
        assert np.median(d) < 0.02 and d.max() < 0.25 and abs(a.defect_score - b.defect_score) < 0.08
        assert d.max() > 0                                           # two paths, not one
