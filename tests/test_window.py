"""Lesion-window classifier: the fusion rule, the shipped classifier on real validation slices, training on
real outlines, and where its opinion shows (prediction, findings record, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tumorlens.data import grouped_split, load_manifest, read_image
from tumorlens.errors import ModelNotFoundError
from tumorlens.inference import Predictor
from tumorlens.labels import CLASS_NAMES, NO_TUMOUR, TUMOUR_CLASSES
from tumorlens.models.window import WINDOW_FILE, WindowClassifier, build_window_net, fuse, window_crop

# unit prototypes for networks built in a test (the shipped classifier carries the aligned head's)
PROTOS = torch.nn.functional.normalize(torch.randn(len(CLASS_NAMES), 384, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_fusion_reweighs_tumour_types_only():
    p = np.array([0.50, 0.30, 0.05, 0.15], np.float32)  # glioma, meningioma, pituitary, no tumour
    sure_meningioma = np.array([0.05, 0.90, 0.05])
    f = fuse(p, sure_meningioma, CLASS_NAMES)
    assert f.sum() == pytest.approx(1.0, abs=1e-6)
    assert f[3] == pytest.approx(0.15) and f[:3].sum() == pytest.approx(0.85, abs=1e-6)  # tumour vs none kept
    assert CLASS_NAMES[int(f.argmax())] == "meningioma"  # a confident window can change the type
    g = np.sqrt(p[:3] / 0.85 * sure_meningioma)
    np.testing.assert_allclose(f[:3], 0.85 * g / g.sum(), rtol=1e-5)  # the geometric mean, equal weights
    same = fuse(p, np.full(3, 1 / 3), CLASS_NAMES)  # an undecided window keeps the network's ranking
    assert list(np.argsort(same)) == list(np.argsort(p)) and same[3] == pytest.approx(0.15)
    reordered = ["no_tumor", "pituitary", "glioma", "meningioma"]  # labels in another order
    fr = fuse(np.array([0.15, 0.05, 0.50, 0.30]), sure_meningioma, reordered)
    np.testing.assert_allclose(fr, f[[3, 2, 0, 1]], atol=1e-6)
    # the window's share and the sharpness: share 1 is the window alone, sharpness leaves the ranking alone
    np.testing.assert_allclose(fuse(p, sure_meningioma, CLASS_NAMES, weight=1.0)[:3], 0.85 * sure_meningioma, rtol=1e-5)
    np.testing.assert_allclose(fuse(p, sure_meningioma, CLASS_NAMES, weight=0.0), p, rtol=1e-5)
    sharp = fuse(p, sure_meningioma, CLASS_NAMES, sharpness=2.0)
    assert list(np.argsort(sharp[:3])) == list(np.argsort(f[:3])) and sharp[1] > f[1] and sharp[3] == pytest.approx(0.15)


def test_the_fused_type_is_the_nearest_prototype_of_the_product_vector():
    """Both opinions are scaled cosines to the same prototypes, so the fused types' log-odds are the
    product vector's cosine differences times one positive number per slice (``product_text_vector``)."""
    from tumorlens.models.window import product_text_vector

    rng = np.random.default_rng(3)
    P = PROTOS.numpy().astype(np.float64)
    types = [CLASS_NAMES.index(c) for c in TUMOUR_CLASSES]
    for _ in range(50):
        t, u = (x / np.linalg.norm(x) for x in rng.normal(size=(2, 384)) + 3 * P[rng.integers(0, 3, 2)])
        s1, s2, w, sharp = rng.uniform(5, 30), rng.uniform(5, 30), rng.uniform(0, 1), rng.uniform(0.5, 2)
        probs = np.exp(s1 * P @ t) / np.exp(s1 * P @ t).sum()
        q = np.exp(s2 * P[types] @ u) / np.exp(s2 * P[types] @ u).sum()
        f = fuse(probs, q, CLASS_NAMES, w, sharp).astype(np.float64)
        v = product_text_vector(t, s1, s2 * u, w)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        log_odds = np.log(f[types[1:]]) - np.log(f[types[0]])
        cos_gaps = (P[types[1:]] - P[types[0]]) @ v
        ratio = log_odds / cos_gaps
        assert ratio[0] > 0 and ratio[1] == pytest.approx(ratio[0], rel=1e-3)
        assert int(np.argmax(f[types])) == int(np.argmax(P[types] @ v))
    np.testing.assert_allclose(product_text_vector(t, s1, s2 * u, 0.0), t, atol=1e-6)  # share 0: the head's own


def test_the_window_network_is_anchored_to_the_prototypes(tmp_path):
    """Its logits are the scaled cosines of its text-space vector to the class prototypes it carries (with
    several members, the mean of theirs: still one vector in text space); a file stored without prototypes
    (before anchoring) is refused, naming the file."""
    from tumorlens.models.window import join_members

    torch.manual_seed(0)
    one, two = build_window_net(PROTOS).eval(), build_window_net(PROTOS).eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        u = one.embed(x)
        np.testing.assert_allclose(u.norm(dim=1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(one.class_logits(x).numpy(), (one.scales[0] * u @ PROTOS.T).numpy(), rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(one(x).numpy(), one.class_logits(x)[:, :3].numpy(), atol=1e-6)
        other = build_window_net(PROTOS[[1, 0, 2, 3]]).eval()
        other.load_state_dict({k: v for k, v in one.state_dict().items() if k != "prototypes"}, strict=False)
        assert not torch.allclose(other(x), one(x))  # other descriptions, other decisions
        pair = join_members([one, two]).eval()
        assert pair.members == 2
        np.testing.assert_allclose(pair.class_logits(x).numpy(),
                                   ((one.class_logits(x) + two.class_logits(x)) / 2).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pair.class_logits(x).numpy(), (pair.scaled(x) @ PROTOS.T).numpy(), atol=1e-4)
    WindowClassifier(net=pair).save(tmp_path / WINDOW_FILE)
    back = WindowClassifier.load(tmp_path / WINDOW_FILE)
    assert back.net.members == 2
    np.testing.assert_allclose(back.prototypes, PROTOS.numpy(), atol=1e-3)
    with torch.no_grad():
        np.testing.assert_allclose(back.net(x).numpy(), pair(x).numpy(), atol=0.05)  # stored in fp16
    st = torch.load(tmp_path / WINDOW_FILE, weights_only=False)
    del st["state_dict"]["prototypes"]
    torch.save(st, tmp_path / "old.pt")
    with pytest.raises(ModelNotFoundError, match="old.pt.*train-window"):
        WindowClassifier.load(tmp_path / "old.pt")


def _opinions(rng, n, network_right, window_right):
    """Synthetic type distributions: the network sure of itself (right ``network_right`` of the time), the
    window less sure but right ``window_right`` of the time."""
    y = rng.integers(0, 3, n)

    def opinion(right, sure):
        said = np.where(rng.random(n) < right, y, (y + rng.integers(1, 3, n)) % 3)
        q = np.full((n, 3), (1 - sure) / 2)
        q[np.arange(n), said] = sure
        return q

    return opinion(network_right, 0.98), opinion(window_right, 0.8), y


def test_fit_fusion_trusts_the_opinion_that_is_right_more_often():
    from tumorlens.training.window import fit_fusion

    rng = np.random.default_rng(0)
    net, win, y = _opinions(rng, 600, 0.85, 0.95)
    w, s = fit_fusion(net, win, y)
    assert w > 0.6 and s > 0
    net2, win2, y2 = _opinions(rng, 600, 0.95, 0.6)  # a window that is mostly noise gets a small share
    assert fit_fusion(net2, win2, y2)[0] < 0.35
    assert fit_fusion(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, int)) == (0.5, 1.0)  # nothing to fit on


def test_left_out_groups_never_see_their_own_labels():
    """The estimate that decides storing refits the fusion without each patient group: relabelling one
    group's slices changes no fused decision inside that group."""
    from tumorlens.training.window import left_out_groups

    rng = np.random.default_rng(1)
    net, win, y = _opinions(rng, 240, 0.85, 0.9)
    views = [{"label": int(y[j]), "group": f"P{j % 6}", "probs": np.append(0.9 * net[j], 0.1).astype(np.float32),
              "crop": True} for j in range(len(y))]
    q = dict(enumerate(win))
    before = left_out_groups(views, q, CLASS_NAMES)
    relabelled = [v | {"label": (v["label"] + 1) % 3} if v["group"] == "P0" else v for v in views]
    after = left_out_groups(relabelled, q, CLASS_NAMES)
    inside = [j for j, v in enumerate(views) if v["group"] == "P0"]
    np.testing.assert_allclose(after[inside], before[inside], atol=1e-6)
    assert not np.allclose(np.delete(after, inside, 0), np.delete(before, inside, 0))  # the others saw them


def test_the_fusion_travels_with_the_stored_classifier(tmp_path):
    clf = WindowClassifier(net=build_window_net(PROTOS).eval(), weight=0.66, sharpness=1.4)
    clf.save(tmp_path / WINDOW_FILE)
    back = WindowClassifier.load(tmp_path / WINDOW_FILE)
    assert (back.weight, back.sharpness) == (0.66, 1.4)
    WindowClassifier(net=build_window_net(PROTOS).eval(), weight=1.5).save(tmp_path / "bad.pt")
    with pytest.raises(ModelNotFoundError, match="bad.pt.*impossible fusion"):
        WindowClassifier.load(tmp_path / "bad.pt")


def test_no_window_without_a_lesion_and_the_crop_is_normalised():
    arr = np.random.default_rng(0).random((120, 100)).astype(np.float32)
    assert window_crop(arr, np.zeros_like(arr, bool)) is None
    clf = WindowClassifier(net=build_window_net(PROTOS).eval())
    assert clf.classify(arr, np.zeros_like(arr, bool)) is None
    m = np.zeros_like(arr, bool)
    m[40:60, 30:55] = True
    c = window_crop(arr, m)
    assert c.shape == (1, 96, 96) and abs(float(c.mean())) < 1e-3 and float(c.std()) == pytest.approx(1.0, abs=0.01)
    q = clf.classify(arr, m)
    assert q.shape == (len(TUMOUR_CLASSES),) and q.sum() == pytest.approx(1.0, abs=1e-5)
    # a second, wider window (train-window --scales 1,2) is a second channel showing more of the surroundings:
    # a bright spot just outside the lesion window shows in it and not in the first
    spot = np.zeros_like(arr)
    spot[50, 90:95] = 10.0  # lesion box 40-60 x 30-55: its window is 1.6 x 25 + 24 = 64 px wide, up to column 74
    two = window_crop(spot, m, scales=(1.0, 2.0))
    assert two.shape == (2, 96, 96)
    np.testing.assert_allclose(two[0], window_crop(spot, m)[0], atol=1e-6)
    assert float(two[0].max()) < 1e-3 < float(two[1].max())
    wide = WindowClassifier(net=build_window_net(PROTOS, 2).eval(), scales=(1.0, 2.0))
    assert wide.classify(arr, m).shape == (len(TUMOUR_CLASSES),)


@pytest.fixture(scope="module")
def val_images(dev2d):
    """Every 5th image of the shipped model's grouped validation part (559 images since session 36)."""
    m = load_manifest(dev2d)
    _, val = grouped_split(m, 0.2, seed=0)
    return [m.records[i] for i in val][::5]


def test_shipped_window_classifier_names_the_tumour_type_better_on_validation(model, val_images):
    """Stored beside the shipped model because the fused decision, its fusion refitted without each patient
    group, won on grouped validation (its figures are in the card, with the fusion it uses); on a sample of
    those held-out slices the fused decision is at least as often right as the network alone, changes no
    tumour-versus-none call, and its opinion is part of the prediction."""
    assert (model.path / WINDOW_FILE).is_file()
    card = json.loads((model.path / "model_card.json").read_text())["window_classifier"]
    assert card["validation"]["accuracy_fused_left_out_groups"] > card["validation"]["accuracy"]
    fused, alone = Predictor(model), Predictor(model, window=False)
    assert fused.window is not None and alone.window is None
    assert (fused.window.weight, fused.window.sharpness) == pytest.approx((card["weight"], card["sharpness"]), abs=1e-4)
    right_f = right_a = asked = 0
    for rec in val_images:
        img = read_image(rec.image)
        a, b = fused.predict(img), alone.predict(img)
        assert (a.label == NO_TUMOUR) == (b.label == NO_TUMOUR)
        assert a.probabilities[NO_TUMOUR] == pytest.approx(b.probabilities[NO_TUMOUR], abs=1e-6)
        np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())  # the mask does not depend on it
        said = a.extra.get("window_classifier")
        if b.label == NO_TUMOUR:
            assert said is None
            continue
        asked += 1
        assert set(said["probabilities"]) == set(TUMOUR_CLASSES)
        assert said["network_probabilities"] == pytest.approx(b.probabilities, abs=1e-4)
        assert said["changed_label"] == (a.label != b.label)
        # the decision is the nearest tumour-type prototype of the product's text-space vector
        sims = a.extra["text_similarities"]
        assert max(TUMOUR_CLASSES, key=sims.get) == a.label
        assert a.text_vector is not None and not np.allclose(a.text_vector, b.text_vector)
        assert (said["weight"], said["sharpness"]) == pytest.approx((fused.window.weight, fused.window.sharpness), abs=1e-4)
        right_f += a.label == rec.label
        right_a += b.label == rec.label
    assert asked >= 60
    assert right_f >= right_a


def test_matched_descriptions_follow_the_decision_vector(model, val_images):
    """The findings' ``text_matches`` are the descriptions nearest to the vector the decision was made from:
    given one, they follow it (here: each class prototype in turn)."""
    from tumorlens.alignment.api import load_alignment, text_matches

    head = load_alignment(model)
    img = read_image(val_images[0].image)
    for i, c in enumerate(CLASS_NAMES):
        matches, _ = text_matches(model, img, vector=head.prototypes[i].numpy())
        assert matches[0]["class_name"] == c and len(matches) == 3
    pred = Predictor(model).predict(img)
    assert text_matches(model, img, vector=pred.text_vector)[0] == head.descriptions_near(pred.text_vector[None])[0]


def test_train_window_learns_from_real_outlines(tmp_path, dev2d, model):
    """A few epochs on real outlines lower the loss; --no-save leaves the model folder as it was."""
    from tumorlens.training.window import train_window

    before = (model.path / WINDOW_FILE).stat().st_mtime
    rec = train_window(data_dir=dev2d, epochs=4, max_images=64, save=False, json_out=tmp_path / "w.json",
                       progress=False, members=1)
    losses = [h["loss"] for h in rec["training"]["history"]]
    assert losses[-1] < losses[0]
    val = rec["validation"]
    assert rec["stored"] is False and val["n"] > 0 and 0 < val["n_windows"] <= val["n"]
    assert 0 <= rec["weight"] <= 1 and rec["sharpness"] > 0 and val["n_groups"] >= 2
    assert 0 <= val["accuracy_fused_left_out_groups"] <= 1
    # the semantic margins of the decisions' text-space vectors, before and after the window joined them
    assert val["semantic_margin_rate_network"] == pytest.approx(val["accuracy"], abs=1e-9)  # nearest prototype decides
    assert 0 <= val["semantic_margin_rate_fused"] <= 1 and len(val["window_scales"]) == 1
    assert (model.path / WINDOW_FILE).stat().st_mtime == before
    assert json.loads((tmp_path / "w.json").read_text())["data"]["same_manifest_as_model"] is True


def test_findings_and_report_say_when_the_window_changed_the_type(model, val_images):
    """The record carries the window's opinion; when it overruled the network's type the report says so."""
    from tumorlens.findings import build_findings
    from tumorlens.report.facts import build_facts

    img = read_image(val_images[0].image)
    net = {"glioma": 0.45, "meningioma": 0.40, "pituitary": 0.05, "no_tumor": 0.10}
    window = {"probabilities": {"glioma": 0.1, "meningioma": 0.85, "pituitary": 0.05}, "weight": 0.5,
              "network_probabilities": net, "changed_label": True}
    probs = dict(zip(CLASS_NAMES, fuse(np.array([net[c] for c in CLASS_NAMES]),
                                       np.array([window["probabilities"][c] for c in TUMOUR_CLASSES]),
                                       CLASS_NAMES).tolist(), strict=True))
    f = build_findings(img, probs, model=model, window=window)
    assert f.classification.label == "meningioma" and f.classification.window_opinion.network_label == "glioma"
    assert any("second classifier that looks only at the lesion" in s for s in build_facts(f).limitations())
    other = "closest to the image belongs to another class"
    assert not any(other in s for s in build_facts(f).limitations())
    # a closest clinical description of another class than the one reported is said, with or without the window
    from tumorlens.alignment.prompts import load_descriptions

    # the model's own descriptions: a record's text matches are quoted only when they are (session 36)
    glioma_text = [{"class_name": "glioma", "description": load_descriptions()["glioma"][0], "similarity": 0.61}]
    texts = build_findings(img, probs, model=model, window=window, text_matches=glioma_text)
    assert any(other in s for s in build_facts(texts).limitations())
    assert any(other in s for s in build_facts(build_findings(img, probs, model=model, text_matches=glioma_text)).limitations())
    agreeing = [dict(glioma_text[0], class_name="meningioma", description=load_descriptions()["meningioma"][0])]
    same = build_findings(img, probs, model=model, window=window, text_matches=agreeing)
    assert not any(other in s for s in build_facts(same).limitations())
    kept = build_findings(img, probs, model=model, window=window | {"changed_label": False})
    assert not any("second classifier" in s for s in build_facts(kept).limitations())
    with pytest.raises(Exception, match="tumour types"):
        build_findings(img, probs, model=model, window=window | {"probabilities": {"glioma": 1.0}})


def test_train_window_cli_checks_before_work():
    import subprocess
    import sys

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "tumorlens.cli", "train-window", *a], capture_output=True,
                              text=True, timeout=120)

    bad = cli("--scales", "1,-2")
    assert bad.returncode != 0 and "--scales '1,-2'" in bad.stderr and "Traceback" not in bad.stderr
    assert "at least 1" in cli("--epochs", "0").stderr
    assert "--members must be at least 1" in cli("--members", "0").stderr
