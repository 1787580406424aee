"""A few real training steps lower the joint loss; `train()` writes a checkpoint with its model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from tumorlens.data import read_image, read_mask
from tumorlens.inference import prepare_slice, resize_2d
from tumorlens.labels import class_index
from tumorlens.models import DualHeadNet, load_model
from tumorlens.training.train import train


def _train_start_model(subset_factory, dev_rows, out) -> dict:
    """A one-epoch resnet18 on 32 real images at 48 px, stored at ``out``: the start of init_from tests.
    Returns its config, for the follow-up run to extend."""
    data = subset_factory([r for r in dev_rows[::40]][:32])
    cfg = {"data": {"root": str(data), "image_size": 48, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": False},
           "output": {"name": Path(out).name, "dir": str(out)}}
    train(cfg, progress=False)
    return cfg


def _real_batch(dev2d, rows, size=64):
    xs, ms, ys = [], [], []
    for r in rows:
        img = read_image(dev2d / r["image"])
        xs.append(prepare_slice(img[0].numpy(), size))
        m = read_mask(dev2d / r["mask"], like=img).float()[None] if r["mask"] else torch.zeros(1, 1, 256, 256)
        ms.append((resize_2d(m, size) >= 0.5).float())
        ys.append(class_index(r["label"]))
    return torch.cat(xs), torch.cat(ms), torch.tensor(ys)


def test_few_steps_on_16_real_images_lower_the_loss(dev2d, dev_rows):
    by = {}
    for r in dev_rows[::7]:
        by.setdefault(r["label"], []).append(r)
    rows = [r for lab in sorted(by) for r in by[lab][:4]]
    assert len(rows) == 16
    x, m, y = _real_batch(dev2d, rows)
    torch.manual_seed(0)
    net = DualHeadNet("resnet18", dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ce, dice = torch.nn.CrossEntropyLoss(), DiceLoss(sigmoid=True, batch=True)

    def loss_fn():
        logits, seg = net(x)
        return ce(logits, y) + dice(seg, m)

    net.train()
    first = float(loss_fn())
    for _ in range(12):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(loss_fn())
    assert last < 0.8 * first, (first, last)


def test_train_writes_checkpoint_and_card(subset_factory, dev_rows, tmp_path):
    rows = [r for r in dev_rows[::40]][:48]
    data = subset_factory(rows)
    cfg = {"data": {"root": str(data), "image_size": 64, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": True},
           "output": {"name": "unit", "dir": str(tmp_path / "unit")}}
    res = train(cfg, progress=False)
    card = json.loads((tmp_path / "unit" / "model_card.json").read_text())
    assert card["data"]["manifest_sha256"] and card["data"]["n_val"] > 0
    assert set(card["metrics"]["validation"]) >= {"accuracy", "tumour_only_accuracy", "seg_dice", "ece"}
    assert card["training"]["seconds_per_epoch"] > 0 and card["config"]["model"]["backbone"] == "resnet18"
    lm = load_model(tmp_path / "unit")
    assert lm.image_size == 64 and lm.name == "unit"
    # fp16 on disk, float32 in memory, same predictions as the trained net (up to fp16 rounding)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = lm.net(x)[0].softmax(1)
        b = res["net"].eval()(x)[0].softmax(1)
    assert np.allclose(a.numpy(), b.numpy(), atol=2e-2)


def test_alignment_loss_selectable_in_the_training_config(subset_factory, dev_rows, tmp_path):
    """``alignment: {enabled: true}`` trains the text projection next to the usual heads: the loss is
    logged per epoch, the card says so, and the default config leaves it out."""
    rows = [r for r in dev_rows[::40]][:32]
    data = subset_factory(rows)
    cfg = {"data": {"root": str(data), "image_size": 48, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": False},
           "alignment": {"enabled": True, "weight": 0.5},
           "output": {"name": "aligned-unit", "dir": str(tmp_path / "aligned")}}
    res = train(cfg, progress=False)
    card = res["card"]
    assert card["alignment"]["joint_loss"] is True
    assert all(np.isfinite(h["alignment_loss"]) and h["alignment_loss"] > 0 for h in card["history"])
    cfg.update(alignment={"enabled": False}, output={"name": "plain-unit", "dir": str(tmp_path / "plain")})
    plain = train(cfg, progress=False)["card"]
    assert plain["alignment"]["joint_loss"] is False and "alignment_loss" not in plain["history"][0]


def test_localisation_loss_trains_the_named_cam_layer(subset_factory, dev_rows, tmp_path):
    """``train.localisation`` adds the Grad-CAM-in-mask loss (double backprop); the layer it trained
    becomes the saved model's ``cam_layer``, which the saliency methods then hook."""
    from tumorlens.training.localisation import LocalisationTerm

    rows = [r for r in dev_rows if r["label"] != "no_tumor" and r.get("mask")][::60][:24]
    data = subset_factory(rows)
    cfg = {"data": {"root": str(data), "image_size": 64, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": False,
                     "localisation": {"weight": 0.5, "layer": "encoder.stages.2"}},
           "output": {"name": "loc-unit", "dir": str(tmp_path / "loc")}}
    res = train(cfg, progress=False)
    assert all(np.isfinite(h["localisation_loss"]) and h["localisation_loss"] > 0 for h in res["card"]["history"])
    lm = load_model(tmp_path / "loc")
    assert lm.net.cam_layer == "encoder.stages.2"
    # the loss reaches the classifier's weights through the gradient of its own score
    net = lm.net.train()
    term = LocalisationTerm(net, "encoder.stages.2", 1.0)
    x = torch.rand(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 10:20, 40:50] = 1
    logits, _ = net(x)
    loss = term.loss(logits, torch.tensor([0, 1]), masks)
    loss.backward()
    term.detach()
    assert loss.item() > 0 and net.classifier[-1].weight.grad.abs().sum() > 0


class _CamToy(torch.nn.Module):
    """A 'network' whose Grad-CAM is its input: the layer is the identity, the score the input's mean."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Identity()
        self.w = torch.nn.Parameter(torch.ones(4, 1))

    def forward(self, x):
        return self.layer(x).mean((2, 3)) @ self.w.T


def test_inside_localisation_asks_only_that_the_maps_peak_lies_in_the_lesion():
    """``localisation.kind: inside`` (multiple-instance): a map peaking on one corner of the lesion
    costs about nothing, one peaking outside costs a lot; the default ``share`` kind instead charges the
    corner peak for not covering the rest of the lesion. Unknown kinds are refused before any data is read."""
    from tumorlens.errors import InvalidInputError
    from tumorlens.training.localisation import LocalisationTerm

    masks = torch.zeros(1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    corner, outside, uniform = torch.zeros(3, 1, 1, 8, 8)
    corner[..., 2, 2], outside[..., 7, 7] = 1.0, 1.0
    uniform[..., 2:6, 2:6] = 1.0
    losses = {}
    for kind in ("inside", "share"):
        net = _CamToy()
        term = LocalisationTerm(net, "layer", 1.0, sharpness=10.0, kind=kind)
        for name, x in (("corner", corner), ("outside", outside), ("uniform", uniform)):
            losses[kind, name] = term.loss(net(x.clone().requires_grad_()), torch.tensor([0]), masks).item()
        term.detach()
    assert losses["inside", "corner"] < 0.01 and losses["inside", "uniform"] < 0.01
    assert losses["inside", "outside"] > 5
    assert losses["share", "corner"] > losses["share", "uniform"] + 2  # share wants the whole lesion covered
    with pytest.raises(ValueError, match="kind"):
        LocalisationTerm(_CamToy(), "layer", kind="peak")
    cfg = {"data": {"root": "/nonexistent"}, "train": {"localisation": {"weight": 0.5, "kind": "peak"}}}
    with pytest.raises(InvalidInputError, match="localisation.kind"):
        train(cfg, progress=False)


def test_distillation_holds_the_starting_models_outputs(subset_factory, dev_rows, tmp_path):
    """``train.distill`` adds KL(teacher || student) with the ``init_from`` model as the frozen teacher;
    it needs a model to start from."""
    base = _train_start_model(subset_factory, dev_rows, tmp_path / "teacher")
    cfg = {**base, "train": {**base["train"], "init_from": str(tmp_path / "teacher"), "lr": 1e-9,
                             "distill": {"weight": 1.0, "temperature": 2.0}},
           "output": {"name": "student", "dir": str(tmp_path / "student")}}
    hist = train(cfg, progress=False)["card"]["history"]
    # student starts as the teacher and barely moves: only dropout and batch statistics separate them
    assert all(np.isfinite(h["distill_loss"]) and 0 <= h["distill_loss"] < 0.5 for h in hist)
    cfg["train"] = {**cfg["train"], "init_from": None}
    with pytest.raises(ValueError, match="init_from"):
        train(cfg, progress=False)


def test_bf16_precision_trains_float32_weights_and_unknown_precision_is_refused(subset_factory, dev_rows, tmp_path):
    """``train.precision: bf16`` autocasts the forward pass (with the localisation term's double
    backprop); weights and the saved checkpoint stay float32/fp16 as usual. Anything else is refused."""
    from tumorlens.errors import InvalidInputError

    rows = [r for r in dev_rows if r["label"] != "no_tumor" and r.get("mask")][::60][:24]
    data = subset_factory(rows)
    cfg = {"data": {"root": str(data), "image_size": 64, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": False, "precision": "bf16",
                     "localisation": {"weight": 0.5, "layer": "encoder.stages.2"}},
           "output": {"name": "bf16-unit", "dir": str(tmp_path / "bf16")}}
    res = train(cfg, progress=False)
    h = res["card"]["history"][0]
    assert np.isfinite(h["loss"]) and np.isfinite(h["localisation_loss"]) and h["localisation_loss"] > 0
    assert res["card"]["config"]["train"]["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in res["net"].parameters())
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "bf16").net(torch.rand(1, 1, 64, 64))[0]).all()
    cfg["train"]["precision"] = "fp8"
    with pytest.raises(InvalidInputError, match="precision"):
        train(cfg, progress=False)


def test_decoder_only_cycle_leaves_encoder_and_classifier_untouched(subset_factory, dev_rows, tmp_path):
    """``train.trainable: [decoder]`` freezes the rest, batch-norm statistics included, so the class
    outputs of the starting model are exactly kept while the seg head moves; ``seg_dice: image`` takes
    the Dice term per tumour image. Unknown parts and modes are refused."""
    from tumorlens.errors import InvalidInputError

    base = _train_start_model(subset_factory, dev_rows, tmp_path / "start")
    start = load_model(tmp_path / "start").net  # as stored (fp16 weights), which is what init_from loads
    cfg = {**base, "train": {**base["train"], "init_from": str(tmp_path / "start"), "lr": 1e-2,
                             "trainable": ["decoder"], "seg_dice": "image"},
           "output": {"name": "seg", "dir": str(tmp_path / "seg")}}
    tuned = train(cfg, progress=False)["net"]
    s0, s1 = start.state_dict(), tuned.state_dict()
    for k in s0:
        same = torch.equal(s0[k].float(), s1[k].float())
        assert same == (not k.startswith("decoder.")) or "num_batches_tracked" in k, k
    x = torch.rand(2, 1, 48, 48)
    start.eval(), tuned.eval()
    with torch.no_grad():
        assert torch.equal(start(x)[0], tuned(x)[0])
        assert not torch.equal(start(x)[1], tuned(x)[1])
    for bad in ({"trainable": ["heads"]}, {"trainable": []}, {"seg_dice": "pixel"},
                {"trainable": ["decoder"], "localisation": {"weight": 0.5, "layer": "encoder.stages.2"}}):
        with pytest.raises(InvalidInputError, match="trainable|seg_dice"):
            train({**cfg, "train": {**cfg["train"], "trainable": None, **bad}}, progress=False)


def test_a_wall_clock_budget_fits_the_schedule_instead_of_cutting_it(subset_factory, dev_rows, tmp_path):
    """``train.budget_minutes`` (a GPU lease, a CI slot): after the first epoch the planned epochs
    shrink to what the budget holds, and the one-cycle schedule is rebuilt for that many, so training
    ends annealed rather than stopped at its peak learning rate."""
    from tumorlens.training.train import fitted_epochs

    # 2 epochs done in 36 s (a slow first one), 6 s each from now on: 2 + (330 - 36) // 6 = 51
    assert fitted_epochs(300, 2, 36.0, 6.0, 5.5) == 51 and fitted_epochs(30, 2, 12.0, 6.0, 60) == 30
    assert fitted_epochs(30, 2, 900.0, 600.0, 1) == 2 and fitted_epochs(30, 2, 12.0, 6.0, None) == 30
    data = subset_factory([r for r in dev_rows[::40]][:32])
    cfg = {"data": {"root": str(data), "image_size": 48, "val_fraction": 0.25},
           "model": {"backbone": "resnet18"},
           "train": {"epochs": 6, "batch_size": 8, "augment": False, "budget_minutes": 1e-4},
           "output": {"name": "budget-unit", "dir": str(tmp_path / "budget")}}
    card = train(cfg, progress=False)["card"]
    assert len(card["history"]) == 2  # the pace is read on the second epoch; the budget holds no more
    assert card["training"]["planned_epochs"] == 6 and card["training"]["scheduled_epochs"] == 2
    from tumorlens.errors import InvalidInputError

    for bad in ({"budget_minutes": 0}, {"budget_minutes": -5}, {"budget_minutes": "soon"}, {"num_workers": -1},
                {"num_workers": 1.5}):
        with pytest.raises(InvalidInputError, match="budget_minutes|num_workers"):
            train({**cfg, "train": {**cfg["train"], **bad}}, progress=False)


def test_loader_workers_each_draw_their_own_augmentation(tmp_path):
    """``train.num_workers``: with worker processes, each re-seeds its copy of the MONAI random
    transforms; forked copies would hand every worker the same augmentation sequence."""
    from tumorlens.data.dataset import ArrayDataset, train_transforms
    from tumorlens.training.train import make_loader

    img = np.zeros((8, 32, 32), np.uint8)
    img[:, 8:20, 6:14] = 200
    ds = ArrayDataset(img, np.zeros_like(img), np.zeros(8, np.int64), train_transforms())
    batches = [x for x, _, _ in make_loader(ds, 2, tmp_path / "manifest.csv", num_workers=2)]
    # batches alternate between the two workers: batch k of worker 0 against batch k of worker 1
    assert any(not torch.equal(batches[k], batches[k + 1]) for k in range(0, len(batches) - 1, 2))


def test_strong_augmentation_changes_intensities_only_within_range_and_keeps_the_mask(dev2d, dev_rows):
    """``train.augment: strong`` adds scanner-like intensity changes (bias field, blur/sharpening, histogram
    shift) to the standard geometry: the image stays in [0, 1] with its air black, the mask moves only with
    the geometry, and an unknown level is refused."""
    import monai.transforms as mt

    from tumorlens.data.dataset import augmentation, train_transforms

    row = next(r for r in dev_rows if r.get("mask"))
    img = read_image(dev2d / row["image"])
    a = torch.as_tensor(img.numpy()[None], dtype=torch.float32)
    m = torch.as_tensor(read_mask(dev2d / row["mask"], like=img).numpy()[None], dtype=torch.float32)
    x = {"image": resize_2d(a / a.max(), 128)[0], "mask": (resize_2d(m, 128, mode="nearest")[0] > 0).float()}
    strong = train_transforms("strong")
    intensity_only = mt.Compose([t for t in strong.transforms if not isinstance(t, (mt.RandFlipd, mt.RandAffined))])
    intensity_only.set_random_state(0)
    changed = 0
    for _ in range(12):
        y = intensity_only(dict(x))
        assert torch.equal(y["mask"], x["mask"])
        assert float(y["image"].min()) >= 0.0 and float(y["image"].max()) <= 1.0
        assert float(y["image"][0, :4, :4].abs().max()) < 0.05  # the corner's air stays dark
        changed += not torch.allclose(y["image"], x["image"], atol=1e-3)
    assert changed >= 6
    assert len(strong.transforms) > len(train_transforms().transforms)
    assert augmentation(False) is None and len(augmentation(True).transforms) == len(train_transforms().transforms)
    with pytest.raises(ValueError, match="augmentation level"):
        augmentation("extreme")


@pytest.mark.parametrize("cfg,why", [
    ({"trian": {"epochs": 1}}, r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ({"train": {"epoch": 1}}, r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be a number"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be a whole number >= 1"),
    ({"train": {"lr": -0.002}}, "train.lr must be > 0"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer 'lion' is not one of"),
    ({"model": {"backbone": "vgg16"}}, "model.backbone 'vgg16' is not one of"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction must lie between 0 and 1"),
    ({"data": {"image_size": "big"}}, "data.image_size must be a number"),
    ({"train": {"augment": "extreme"}}, "train.augment must be true, false or one of"),
])
def test_a_config_is_checked_before_any_data_is_read(cfg, why, tmp_path):
    """Session 35 probe: a typo'd key trained 30 epochs on the defaults without a word; wrong types and unknown
    backbones or optimizers were tracebacks, some after every image was loaded, val_fraction 0 after an epoch."""
    from tumorlens.errors import InvalidInputError

    cfg = {**cfg, "data": {**cfg.get("data", {}), "root": str(tmp_path / "no-such-data")}}
    with pytest.raises(InvalidInputError, match=why) as e:
        train(cfg, progress=False, source="mine.yaml")
    assert str(e.value).startswith("mine.yaml: ")


def test_training_into_a_model_folder_replaces_nothing_unless_asked_and_then_all_of_it(subset_factory, dev_rows,
                                                                                    tmp_path):
    """Training into the shipped model's folder (a copy) kept its refiner and window classifier beside the new
    network, which then used them (accuracy 0.375 with them, 0.479 without; session 35 probe); training the same
    name twice replaced the first model without a word."""
    import shutil

    from tumorlens.errors import InvalidInputError
    from tumorlens.inference import Predictor
    from tumorlens.models import load_model

    out = tmp_path / "mine"
    shutil.copytree(load_model().path, out)
    with pytest.raises(InvalidInputError, match="holds a trained model already"):
        _train_start_model(subset_factory, dev_rows, out)
    assert (out / "refiner.pt").exists() and (out / "window_classifier.pt").exists()
    data = subset_factory([r for r in dev_rows[::40]][:32])
    train({"data": {"root": str(data), "image_size": 48, "val_fraction": 0.25}, "model": {"backbone": "resnet18"},
           "train": {"epochs": 1, "batch_size": 8, "augment": False},
           "output": {"name": "mine", "dir": str(out), "overwrite": True}}, progress=False)
    left = {p.name for p in out.iterdir()}
    assert left == {"checkpoint.pt", "model_card.json"}, left
    pred = Predictor(load_model(out))
    assert pred.refiner is None and pred.window is None and pred.aligned_head is None
