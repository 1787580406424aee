"""Text-anchored classification (issue 8): prompts, cached prototypes, Tip-Adapter math on real
features, semantic margin, prompt neutralisation, negation retrieval, and the public API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tumorlens.alignment.features import extract_features
from tumorlens.alignment.head import build_head, classifier_layer
from tumorlens.alignment.margin import margin_rate, semantic_margins
from tumorlens.alignment.prompts import ablate, is_negated, load_descriptions
from tumorlens.alignment.retrieval import negation_retrieval, strip_negation
from tumorlens.alignment.text import build_prototypes
from tumorlens.alignment.tip_adapter import TipAdapter
from tumorlens.errors import InvalidInputError
from tumorlens.labels import CLASS_NAMES, TUMOUR_CLASSES

PER_CLASS_TRAIN, PER_CLASS_VAL = 24, 10


@pytest.fixture(scope="module")
def protos():
    return build_prototypes(load_descriptions())


@pytest.fixture(scope="module")
def real_subset(dev2d, dev_rows, model):
    """Real images of each class at the model's size; train and val parts from different groups."""
    from tumorlens.data import read_image
    from tumorlens.inference import prepare_slice

    parts = {"train": ([], []), "val": ([], [])}
    for ci, c in enumerate(CLASS_NAMES):
        rows = [r for r in dev_rows if r["label"] == c]
        groups = sorted({r["group"] for r in rows})
        val_groups = set(groups[: max(1, len(groups) // 5)])
        tr = [r for r in rows if r["group"] not in val_groups]
        va = [r for r in rows if r["group"] in val_groups]
        for name, pool, n in (("train", tr, PER_CLASS_TRAIN), ("val", va, PER_CLASS_VAL)):
            for r in pool[:: max(1, len(pool) // n)][:n]:
                img = read_image(dev2d / r["image"], expect="2d")
                parts[name][0].append(prepare_slice(img[0].numpy(), model.image_size)[0])
                parts[name][1].append(ci)
    out = {}
    for name, (xs, ys) in parts.items():
        x = torch.stack(xs)
        f, lo = extract_features(model.net, x)
        out[name] = {"x": x, "y": np.asarray(ys), "f": f, "logits": lo}
    return out


# ---- prompts and prototypes -------------------------------------------------------------------

def test_prompts_cover_classes_with_negated_no_tumour_phrasings():
    desc = load_descriptions()
    assert list(desc) == list(CLASS_NAMES)
    assert all(len(v) >= 4 for v in desc.values())
    negated = [d for d in desc["no_tumor"] if is_negated(d)]
    assert len(negated) >= 3, negated
    assert any("no enhancing mass" in d.lower() for d in desc["no_tumor"])


def test_bad_prompts_file_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("classes:\n  glioma: ['a glioma']\n")
    with pytest.raises(InvalidInputError, match="p.yaml"):
        load_descriptions(bad)
    bad.write_text("classes: [1, 2]\n")
    with pytest.raises(InvalidInputError, match="classes"):
        load_descriptions(bad)


def test_prototypes_cached_and_deterministic(tmp_path, monkeypatch, protos):
    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path))
    desc = load_descriptions()
    a = build_prototypes(desc)  # computed into the empty cache
    files = list((tmp_path / "alignment").glob("prototypes-*.npz"))
    assert len(files) == 1 and a["key"] in files[0].name
    mtime = files[0].stat().st_mtime_ns
    b = build_prototypes(desc)  # read back, not recomputed
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a["prototypes"], b["prototypes"])
    np.testing.assert_allclose(a["prototypes"], protos["prototypes"], atol=1e-5)  # fresh vs other cache
    assert a["prototypes"].shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(a["prototypes"], axis=1), 1.0, atol=1e-5)
    c = build_prototypes(ablate(desc, "names"))
    assert c["key"] != a["key"] and not np.allclose(c["prototypes"], a["prototypes"])


# ---- Tip-Adapter ------------------------------------------------------------------------------

def test_tip_adapter_math_on_real_features(real_subset):
    tr, va = real_subset["train"], real_subset["val"]
    cache = TipAdapter(tr["f"], tr["y"], 4, beta=5.5)
    # affinity by hand: centre on the training mean, L2-normalise, exp(-beta (1 - cos))
    mu = tr["f"].mean(0)
    k = (tr["f"] - mu) / np.linalg.norm(tr["f"] - mu, axis=1, keepdims=True)
    q = (va["f"] - mu) / np.linalg.norm(va["f"] - mu, axis=1, keepdims=True)
    want = np.exp(-5.5 * (1 - q @ k.T))
    np.testing.assert_allclose(cache.affinity(torch.as_tensor(va["f"])).numpy(), want, rtol=1e-4, atol=1e-6)
    s = cache.scores(torch.as_tensor(va["f"])).numpy()
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-5)
    # class-balanced values: every class carries the same total weight
    np.testing.assert_allclose(cache.values.sum(0).numpy(), len(tr["y"]) / 4, rtol=1e-6)
    # a very sharp cache is a nearest-neighbour lookup: each key retrieves its own label
    own = cache.scores(torch.as_tensor(tr["f"]), beta=2000.0).argmax(1).numpy()
    assert (own == tr["y"]).mean() > 0.95
    # round trip through the stored state
    back = TipAdapter.from_state(cache.state())
    np.testing.assert_allclose(back.scores(torch.as_tensor(va["f"])).numpy(), s, atol=2e-3)


# ---- semantic margin ------------------------------------------------------------------------------

def test_semantic_margin_rate_on_constructed_case():
    P = np.eye(4, 8, dtype=np.float32)  # four orthonormal prototypes
    t = np.zeros((5, 8), np.float32)
    t[0, [0, 1]] = [0.9, 0.1]   # class 0: margin +0.8 (before normalisation)
    t[1, [1, 2]] = [0.5, 0.5]   # class 1: tie -> margin 0, not positive
    t[2, [2, 3]] = [0.2, 0.8]   # class 2: closer to 3 -> negative
    t[3, 3] = 2.0               # class 3: margin +1 (length does not matter)
    t[4, [0, 3]] = [0.6, 0.8]   # class 0: negative
    y = np.array([0, 1, 2, 3, 0])
    m = semantic_margins(t, y, P)
    n0 = np.hypot(0.9, 0.1)
    np.testing.assert_allclose(m, [0.8 / n0, 0.0, -0.6 / np.hypot(0.2, 0.8), 1.0, -0.2], atol=1e-6)
    assert margin_rate(m) == pytest.approx(2 / 5)
    assert margin_rate(m, min_margin=0.9) == pytest.approx(1 / 5)


# ---- prompt ablation: the text must do work -------------------------------------------------------

def test_prompt_neutralisation_changes_fused_predictions(real_subset, model, protos):
    tr, va = real_subset["train"], real_subset["val"]
    clf = classifier_layer(model.net)
    head = build_head(tr["f"], tr["y"], protos, clf, fusion="textspace")
    head.tune(va["f"], va["y"])
    ref = head.predict(va["f"])
    neutral = build_prototypes(ablate(load_descriptions(), "neutral"))["prototypes"]
    shuffled = build_prototypes(ablate(load_descriptions(), "shuffle"))["prototypes"]
    changed_neutral = (head.predict(va["f"], prototypes=neutral) != ref).mean()
    assert changed_neutral >= 0.05, changed_neutral
    # the projection alone (no cache, no classifier) classifies through the described prototypes:
    # it finds the class whose *text* fits, so giving each class another class's text moves it
    parts = head.parts(va["f"])
    proto_only = head.combine(parts, 0.0, 0.0)[0].argmax(1).numpy()
    assert (proto_only == va["y"]).mean() > 0.25 + 0.1
    swapped = head.combine(parts, 0.0, 0.0, prototypes=shuffled)[0].argmax(1).numpy()
    assert (swapped != proto_only).mean() >= 0.5


def test_aligned_head_roundtrip(tmp_path, real_subset, model, protos):
    from tumorlens.alignment.head import AlignedHead

    tr, va = real_subset["train"], real_subset["val"]
    head = build_head(tr["f"], tr["y"], protos, classifier_layer(model.net))
    head.alpha, head.beta, head.gamma = 1.0, 5.5, 0.5
    back = AlignedHead.load(head.save(tmp_path / "alignment.pt"))
    assert (back.predict(va["f"]) == head.predict(va["f"])).mean() > 0.95
    assert (back.alpha, back.beta, back.gamma, back.fusion) == (1.0, 5.5, 0.5, "textspace")


# ---- negation retrieval ---------------------------------------------------------------------------

def test_negation_retrieval_json(protos):
    assert strip_negation("MRI without any tumour") == "MRI with tumour"
    assert strip_negation("no evidence of a brain tumour") == "with a brain tumour"
    # "images" = the description embeddings themselves: a perfect text-space encoder
    res = negation_retrieval(protos["desc_emb"], protos["desc_class"], k=5)
    json.dumps(res)
    assert set(res) >= {"k", "queries", "affirmative", "negated"}
    assert set(res["negated"]) == {"direct", "negation_aware"}
    for part in (res["affirmative"], res["negated"]["direct"], res["negated"]["negation_aware"]):
        assert set(part) == {"n_queries", "n_scored", "precision_at_k", "map"} and 0 <= part["precision_at_k"] <= 1
    assert res["affirmative"]["n_queries"] >= 3 and res["negated"]["direct"]["n_queries"] >= 3
    q = {r["query"]: r for r in res["queries"]}
    # contrastive negation scoring beats embedding the negated sentence as it is
    assert res["negated"]["negation_aware"]["precision_at_k"] > res["negated"]["direct"]["precision_at_k"]
    assert q["MRI without any tumour"]["negated"] and q["MRI without any tumour"]["relevant"] == ["no_tumor"]


# ---- public API used by evaluate and the findings record --------------------------------------------

@pytest.fixture
def probed_model(tmp_path, model, real_subset, protos):
    """A copy of the model folder with a text probe fitted on the small real subset."""
    from tumorlens.alignment.experiment import fit_probe_head
    from tumorlens.models import load_model

    d = tmp_path / "m"
    d.mkdir()
    for f in ("checkpoint.pt", "model_card.json"):
        if (model.path / f).exists():
            shutil.copy(model.path / f, d / f)
    m = load_model(d)
    tr = real_subset["train"]
    split = {"train_f": tr["f"], "train_y": tr["y"]}
    fit_probe_head(m, split, protos).save(d / "text_probe.pt")
    return m


def test_semantic_margin_rate_and_nearest_descriptions_api(probed_model, real_subset):
    from tumorlens.alignment import load_probe, nearest_descriptions, semantic_margin_rate

    va = real_subset["val"]
    names = [CLASS_NAMES[i] for i in va["y"]]
    rate = semantic_margin_rate(probed_model, va["x"], names, head="probe")
    head = load_probe(probed_model, fit_if_missing=False)
    want = margin_rate(semantic_margins(head.text_vectors(va["f"]), va["y"], head.prototypes))
    assert rate == pytest.approx(want, abs=1e-6) and 0.0 <= rate <= 1.0
    matches = nearest_descriptions(probed_model, va["x"][0], k=3, head="probe")
    assert len(matches) == 3 and set(matches[0]) == {"class_name", "description", "similarity"}
    assert matches[0]["class_name"] in CLASS_NAMES
    assert matches[0]["similarity"] >= matches[1]["similarity"] >= matches[2]["similarity"]
    assert matches[0]["description"] in sum(load_descriptions().values(), [])
    with pytest.raises(InvalidInputError, match="labels"):
        semantic_margin_rate(probed_model, va["x"], names[:-1], head="probe")
    with pytest.raises(InvalidInputError, match="unknown label"):
        semantic_margin_rate(probed_model, va["x"][:1], ["astrocytoma"], head="probe")
    with pytest.raises(InvalidInputError, match="expected"):
        semantic_margin_rate(probed_model, torch.zeros(2, 3, 8, 8), names[:2], head="probe")


def test_stale_probe_for_other_weights_is_ignored(probed_model, tmp_path, monkeypatch):
    from tumorlens.alignment import load_probe

    monkeypatch.setenv("TUMORLENS_CACHE", str(tmp_path / "cache"))  # no probe fitted earlier in .cache

    st = torch.load(probed_model.path / "text_probe.pt", weights_only=False)
    st["meta"]["checkpoint_sha"] = "0" * 16
    torch.save(st, probed_model.path / "text_probe.pt")
    assert load_probe(probed_model, fit_if_missing=False) is None


def test_cli_registers_alignment_commands():
    from tumorlens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in ("align", "ablate-prompts", "retrieve"):
        assert cmd in sub.choices
    args = parser.parse_args(["retrieve", "MRI without any tumour", "--k", "2"])
    assert args.queries == ["MRI without any tumour"] and args.k == 2 and callable(args.func)


def test_retrieve_over_a_folder_keeps_to_max_images(subset_factory, dev_rows, tmp_path):
    """``--max-images`` was ignored with ``--data``: a 3,448-image folder was searched whole (session 39 audit)."""
    import json

    from tumorlens import cli

    folder = subset_factory(dev_rows[::300])
    out = tmp_path / "r.json"
    assert cli.main(["retrieve", "MRI with a glioma", "--data", str(folder), "--max-images", "4", "--k", "3",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["searched"] == 4 and len(res["results"]["MRI with a glioma"]) == 3


def test_alignment_loss_term_trains_projection_and_encoder(dev2d, dev_rows, protos):
    """Option (b): the loss term from a training config; one step moves encoder and projection."""
    from tumorlens.alignment.training import AlignmentTerm
    from tumorlens.data import read_image
    from tumorlens.inference import prepare_slice
    from tumorlens.models import build_model

    net = build_model({"model": {"backbone": "resnet18"}})
    assert AlignmentTerm.from_config({}, net) is None
    term = AlignmentTerm.from_config({"alignment": {"enabled": True, "weight": 1.0}}, net)
    rows = [next(r for r in dev_rows if r["label"] == c) for c in CLASS_NAMES]
    x = torch.cat([prepare_slice(read_image(dev2d / r["image"], expect="2d")[0].numpy(), 64) for r in rows])
    y = torch.arange(4)
    opt = torch.optim.SGD(list(net.parameters()) + term.parameters(), lr=0.05)
    net.train()
    logits, _seg = net(x)
    loss = term.loss(y)
    assert torch.isfinite(loss) and loss.item() > 0
    before = term.projection.mlp[-1].weight.detach().clone()
    (torch.nn.functional.cross_entropy(logits, y) + loss).backward()
    assert net.encoder.stages[0][0].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, term.projection.mlp[-1].weight)
    with pytest.raises(RuntimeError):
        term.loss(y)  # features are consumed once per forward pass
    term.detach()


def test_stored_aligned_head_becomes_the_default_decision(probed_model, real_subset, protos):
    from tumorlens.alignment import aligned_probabilities, text_head
    from tumorlens.alignment.features import checkpoint_sha

    va, tr = real_subset["val"], real_subset["train"]
    probs, kind = aligned_probabilities(probed_model, va["x"][:4])
    assert kind == "plain" and probs.shape == (4, 4)
    np.testing.assert_allclose(probs, torch.as_tensor(va["logits"][:4]).softmax(1).numpy(), atol=1e-4)
    head = build_head(tr["f"], tr["y"], protos, classifier_layer(probed_model.net))
    head.tune(va["f"], va["y"])
    head.meta = {"checkpoint_sha": checkpoint_sha(probed_model)}
    head.save(probed_model.path / "alignment.pt")
    h, kind = text_head(probed_model)
    assert kind == "aligned"
    # loaded once per file version and shared; a rewritten adapter is loaded afresh
    from tumorlens.alignment import load_alignment

    assert load_alignment(probed_model) is h
    head.meta = {**head.meta, "note": "rewritten"}
    head.save(probed_model.path / "alignment.pt")
    h2 = load_alignment(probed_model)
    assert h2 is not h and h2.meta["note"] == "rewritten"
    probs, kind = aligned_probabilities(probed_model, va["x"])
    assert kind == "aligned"
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == head.predict(va["f"])).mean() > 0.95


def test_semantic_margin_for_folder_matches_tensor_api(probed_model, dev_rows, subset_factory):
    """What ``tumorlens evaluate`` calls: a manifest folder in, the same rate as for the tensors."""
    from tumorlens.alignment import semantic_margin_for_folder, semantic_margin_rate
    from tumorlens.data import read_image
    from tumorlens.inference import prepare_slice

    rows = dev_rows[::431][:8]
    folder = subset_factory(rows)
    rate = semantic_margin_for_folder(folder, model=probed_model, limit=6, head="probe", progress=False)
    x = torch.cat([prepare_slice(read_image(folder / r["image"])[0].numpy(), probed_model.image_size)
                   for r in rows[:6]])
    assert rate == pytest.approx(semantic_margin_rate(probed_model, x, [r["label"] for r in rows[:6]],
                                                      head="probe"), abs=1e-6)
    # ``tumorlens evaluate`` on a plain model gives the probe's rate with its count and head (it said n 0)
    import json

    from tumorlens import cli

    out = folder.parent / "plain.json"
    assert cli.main(["evaluate", str(folder), "--model", str(probed_model.path), "--limit", "6", "--json",
                     str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["semantic_margin_head"] == "probe" and m["semantic_margin_n"] == 6
    assert m["semantic_margin_rate"] == pytest.approx(rate, abs=1e-6)


def test_a_stored_head_says_when_the_prompt_file_changed_after_it_was_fitted(model, tmp_path, monkeypatch):
    """Editing configs/prompts does not silently half-change the validated head: it keeps its fitted
    descriptions and says so until `tumorlens align` refits it."""
    import shutil

    import yaml

    from tumorlens.alignment.api import load_alignment, stale_texts
    from tumorlens.paths import configs_dir, models_dir

    head = load_alignment(model)
    assert head is not None and stale_texts(head) is None
    home = tmp_path / "home"
    shutil.copytree(configs_dir(), home / "configs")
    monkeypatch.setenv("TUMORLENS_MODELS_DIR", str(models_dir()))
    monkeypatch.setenv("TUMORLENS_HOME", str(home))
    prompts = home / "configs" / "prompts" / "classes.yaml"
    data = yaml.safe_load(prompts.read_text())
    data["classes"]["glioma"][0] = "an infiltrative intra-axial mass (edited)"
    prompts.write_text(yaml.safe_dump(data))
    assert "changed after the text head was fitted" in (stale_texts(head) or "")


def test_text_queries_on_real_images_assert_what_they_say_and_negate_what_they_negate(model, dev2d, dev_rows):
    """The first 6 images per class of the dev manifest, in the shipped head's text space. Before the baseline and
    the parser, "MRI with a glioma" put tumour-free images first, "glioma ruled out" returned gliomas,
    "pituitary adenoma with no oedema" returned no pituitary image and "not without tumour" only
    tumour-free ones."""
    from tumorlens.alignment.api import text_head
    from tumorlens.alignment.features import extract_features
    from tumorlens.alignment.retrieval import parse_negation, query_scores
    from tumorlens.data import read_image
    from tumorlens.inference import prepare_slice

    assert parse_negation("glioma ruled out") == ("", "glioma")
    assert parse_negation("Pituitary adenoma with no oedema.") == ("pituitary adenoma", "oedema")
    assert parse_negation("not without tumour") == ("tumour", None)
    assert parse_negation("MRI with a glioma") == ("mri with a glioma", None)
    assert parse_negation("tumour-free brain") == ("", "tumour brain")
    assert parse_negation("meningioma cannot be excluded") == ("meningioma", None)
    assert parse_negation("not a normal scan") == parse_negation("abnormal scan") == ("brain mri with a tumour", None)
    # a contrast asserts what follows it (the probe's "not X but Y" returned tumour-free images)
    assert parse_negation("not a meningioma but a pituitary adenoma") == ("a pituitary adenoma", "meningioma")
    assert parse_negation("MRI sans tumeur") == ("mri", "tumeur")
    rows = [r for c in CLASS_NAMES for r in [x for x in dev_rows if x["label"] == c][:6]]
    x = torch.cat([prepare_slice(read_image(dev2d / r["image"])[0].numpy(), model.image_size) for r in rows])
    head, _ = text_head(model)
    t = head.text_vectors(extract_features(model.net, x)[0]).numpy()
    y = np.array([r["label"] for r in rows])
    cases = [("MRI with a glioma", {"glioma"}), ("glioma ruled out", set(CLASS_NAMES) - {"glioma"}),
             ("pituitary adenoma with no oedema", {"pituitary"}), ("not without tumour", set(TUMOUR_CLASSES)),
             ("no evidence of a brain tumour", {"no_tumor"}), ("normal brain MRI", {"no_tumor"}),
             ("tumour-free brain", {"no_tumor"}), ("meningioma cannot be excluded", {"meningioma"}),
             ("not a normal scan", set(TUMOUR_CLASSES)), ("normal study", {"no_tumor"}),
             ("ring-enhancing intra-axial mass", {"glioma"}),
             ("not a meningioma but a pituitary adenoma", {"pituitary"}), ("not a glioma but a meningioma", {"meningioma"}),
             ("healthy brain", {"no_tumor"}), ("neither glioma nor meningioma", {"pituitary", "no_tumor"})]
    for q, rel in cases:
        top = np.argsort(-query_scores(t, q))[:4]
        assert np.isin(y[top], list(rel)).mean() >= 0.75, (q, y[top])
    with pytest.raises(InvalidInputError, match="empty"):
        query_scores(t, "  ")
    # a query about something else is said to be so (its ranking is a ranking of nothing)
    from tumorlens.alignment.retrieval import RELEVANCE_MIN, query_relevance

    assert all(query_relevance(q) < RELEVANCE_MIN for q in ("banana", "stock market prices", "the patient John Smith"))
    assert all(query_relevance(q) > RELEVANCE_MIN for q in ("menigioma", "MRI without any tumour", "glioma ruled out"))


def test_projection_is_trained_by_the_optimiser_it_is_given(protos):
    """The stability grid varies the head's optimiser: ``fit_projection`` must use the one named (an SGD step
    of 1e-7 leaves the map where AdamW moves it) and refuse a name it does not know."""
    from tumorlens.alignment.projection import fit_projection

    rng = np.random.default_rng(0)
    y = np.arange(64) % len(CLASS_NAMES)
    feats = rng.normal(size=(64, 16)).astype(np.float32) + 2.0 * np.eye(16, dtype=np.float32)[y]
    kw = {"epochs": 2, "seed": 3}
    start = fit_projection(feats, y, protos["prototypes"], epochs=0, seed=3).mlp[-1].weight
    sgd = fit_projection(feats, y, protos["prototypes"], optimizer="sgd", lr=1e-7, **kw).mlp[-1].weight
    adamw = fit_projection(feats, y, protos["prototypes"], optimizer="adamw", lr=1e-2, **kw).mlp[-1].weight
    assert (sgd - start).abs().max() < 1e-6 < (adamw - start).abs().max()
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        fit_projection(feats, y, protos["prototypes"], optimizer="lion", **kw)
