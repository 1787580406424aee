"""The aligned head: text-space projection + class prototypes + Tip-Adapter cache + the model's own
classifier, fused into one decision.

Two fusions are implemented, because the choice decides whether the text matters at all:

* ``onehot`` (TumorCLIP / Tip-Adapter as published):
  ``logits = s * (cos(z, P) + alpha * q + gamma * p)`` with ``z`` the projected image, ``P`` the
  prototypes, ``q`` the cache's class scores and ``p`` the classifier's probabilities. The cache and
  the classifier can out-vote the prototypes, so editing the text may change almost nothing
  (prototypes are decorative).
* ``textspace`` (the default here): every term is first expressed as a vector in text space and the
  decision is the nearest prototype of their sum:
  ``t = z + alpha * q @ P + gamma * p @ P``, ``logits = s * cos(t, P)``.
  The cache's one-hot values become the prototypes of the neighbours' labels (identical to
  Tip-Adapter when the prototypes are orthonormal), so nothing reaches the decision except through
  the text: with uninformative descriptions the classes cannot be told apart.

``alpha``, ``beta`` (cache sharpness) and ``gamma`` are tuned on the grouped validation split only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tumorlens.alignment.projection import DEFAULT_TEMPERATURE, TextProjection, fit_projection
from tumorlens.alignment.tip_adapter import TipAdapter
from tumorlens.labels import CLASS_NAMES

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
BETAS = (1.0, 3.0, 5.5, 10.0, 20.0, 40.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0)
FUSIONS = ("textspace", "onehot")
FORMAT_VERSION = 1


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)


@dataclass
class AlignedHead:
    projection: TextProjection
    prototypes: torch.Tensor  # [C, D] unit
    classifier: nn.Linear  # the model's own final layer (pooled features -> logits)
    cache: TipAdapter | None
    texts: dict  # desc_emb [M, D], desc_class [M], desc_text [M], key
    alpha: float = 1.0
    beta: float = 5.5
    gamma: float = 0.0
    fusion: str = "textspace"
    scale: float = 1.0 / DEFAULT_TEMPERATURE
    meta: dict = field(default_factory=dict)

    # ---- decision -----------------------------------------------------------------------------
    @torch.no_grad()
    def parts(self, feats, beta: float | None = None) -> dict:
        f = _t(feats)
        z = self.projection(f)
        p = self.classifier(f).softmax(1)
        q = self.cache.scores(f, self.beta if beta is None else beta) if self.cache is not None else torch.zeros_like(p)
        return {"z": z, "p": p, "q": q}

    def combine(self, parts: dict, alpha: float, gamma: float, prototypes: torch.Tensor | None = None,
                fusion: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], text-space vector [B, D] unit)."""
        P = self.prototypes if prototypes is None else _t(prototypes)
        fusion = fusion or self.fusion
        z, p, q = parts["z"], parts["p"], parts["q"]
        if fusion == "textspace":
            t = F.normalize(z + alpha * (q @ P) + gamma * (p @ P), dim=-1)
            return self.scale * (t @ P.T), t
        if fusion == "onehot":
            return self.scale * (z @ P.T + alpha * q + gamma * p), z
        raise ValueError(f"unknown fusion {fusion!r}: {', '.join(FUSIONS)}")

    @torch.no_grad()
    def logits(self, feats, prototypes=None) -> torch.Tensor:
        return self.combine(self.parts(feats), self.alpha, self.gamma, prototypes)[0]

    @torch.no_grad()
    def text_vectors(self, feats, prototypes=None) -> torch.Tensor:
        """Each image as one unit vector in text space (what the decision compares to prototypes)."""
        return self.combine(self.parts(feats), self.alpha, self.gamma, prototypes)[1]

    @torch.no_grad()
    def predict(self, feats, prototypes=None) -> np.ndarray:
        return self.logits(feats, prototypes).argmax(1).numpy()

    # ---- tuning -------------------------------------------------------------------------------
    @torch.no_grad()
    def tune(self, feats, labels, alphas=ALPHAS, betas=BETAS, gammas=GAMMAS) -> dict:
        """Grid-search alpha, beta, gamma for accuracy on (validation) ``feats``; ties -> lower NLL,
        then the smaller alpha + gamma (the text term keeps the most weight). Sets them; returns the best."""
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if self.cache is None:
            alphas, betas = (0.0,), (self.beta,)
        best = None
        for b in betas:
            parts = self.parts(feats, beta=b)
            for a, g in itertools.product(alphas, gammas):
                lo, _ = self.combine(parts, a, g)
                acc = float((lo.argmax(1) == y).float().mean())
                nll = float(F.cross_entropy(lo, y))
                key = (-acc, round(nll, 4), a + g)
                if best is None or key < best[0]:
                    best = (key, {"alpha": a, "beta": b, "gamma": g, "accuracy": acc, "nll": nll})
        chosen = best[1]
        self.alpha, self.beta, self.gamma = chosen["alpha"], chosen["beta"], chosen["gamma"]
        if self.cache is not None:
            self.cache.beta = self.beta
        # temperature: the logit scale that minimises validation NLL (never changes a prediction)
        unit = self.combine(self.parts(feats), self.alpha, self.gamma)[0] / self.scale
        scales = torch.as_tensor(np.geomspace(1.0, 300.0, 80), dtype=torch.float32)
        nlls = torch.stack([F.cross_entropy(unit * sc, y) for sc in scales])
        self.scale = float(scales[int(nlls.argmin())])
        chosen["scale"] = self.scale
        return chosen

    @torch.no_grad()
    def crossfit_accuracy(self, feats, labels, groups) -> float:
        """Less optimistic accuracy: tune on half of the validation groups, test on the other half,
        and the other way round. Restores the current hyper-parameters."""
        keep = (self.alpha, self.beta, self.gamma, self.scale)
        groups = np.asarray(groups)
        ug = sorted(set(groups.tolist()))
        half = np.isin(groups, ug[::2])
        f, y = _t(feats), np.asarray(labels)
        correct = 0
        for a_mask in (half, ~half):
            if a_mask.all() or not a_mask.any():
                continue
            self.tune(f[torch.as_tensor(a_mask)], y[a_mask])
            test = ~a_mask
            correct += int((self.predict(f[torch.as_tensor(test)]) == y[test]).sum())
        self.alpha, self.beta, self.gamma, self.scale = keep
        if self.cache is not None:
            self.cache.beta = self.beta
        return correct / len(y)

    # ---- text ---------------------------------------------------------------------------------
    def nearest_descriptions(self, feats, k: int = 3) -> list[list[dict]]:
        return self.descriptions_near(self.text_vectors(feats), k)

    def descriptions_near(self, text_vectors, k: int = 3) -> list[list[dict]]:
        """The ``k`` class descriptions nearest to each unit text-space vector [N, D]."""
        t = _t(text_vectors)
        emb = _t(self.texts["desc_emb"])
        sims = (t @ emb.T).numpy()
        out = []
        for row in sims:
            order = np.argsort(-row)[:k]
            out.append([{"class_name": CLASS_NAMES[int(self.texts["desc_class"][j])],
                         "description": str(self.texts["desc_text"][j]), "similarity": round(float(row[j]), 4)}
                        for j in order])
        return out

    # ---- persistence --------------------------------------------------------------------------
    def state(self) -> dict:
        pr = self.projection
        return {
            "format": FORMAT_VERSION,
            "projection": {"in_dim": pr.in_dim, "text_dim": pr.text_dim, "hidden": pr.hidden,
                           "state_dict": pr.state_dict()},
            "prototypes": self.prototypes,
            "classifier": {"weight": self.classifier.weight.detach().clone(),
                           "bias": self.classifier.bias.detach().clone()},
            "cache": self.cache.state() if self.cache is not None else None,
            "texts": {"desc_emb": torch.as_tensor(self.texts["desc_emb"]),
                      "desc_class": torch.as_tensor(self.texts["desc_class"]),
                      "desc_text": list(self.texts["desc_text"]), "key": self.texts.get("key")},
            "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "fusion": self.fusion,
            "scale": self.scale, "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_state(cls, st: dict) -> AlignedHead:
        pj = st["projection"]
        proj = TextProjection(pj["in_dim"], pj["text_dim"], hidden=pj["hidden"])
        proj.load_state_dict(pj["state_dict"])
        proj.eval()
        w = st["classifier"]["weight"]
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(st["classifier"]["bias"])
        tx = st["texts"]
        texts = {"desc_emb": tx["desc_emb"].numpy(), "desc_class": tx["desc_class"].numpy(),
                 "desc_text": list(tx["desc_text"]), "key": tx.get("key")}
        cache = TipAdapter.from_state(st["cache"]) if st.get("cache") else None
        return cls(projection=proj, prototypes=st["prototypes"].float(), classifier=lin.eval(), cache=cache,
                   texts=texts, alpha=st["alpha"], beta=st["beta"], gamma=st["gamma"], fusion=st["fusion"],
                   scale=st["scale"], meta=st.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> AlignedHead:
        return cls.from_state(torch.load(Path(path), map_location="cpu", weights_only=False))


def classifier_layer(net) -> nn.Linear:
    """The dual-head net's final linear layer (``net.embed`` output -> class logits)."""
    lin = net.classifier[-1]
    if not isinstance(lin, nn.Linear):
        raise TypeError("expected the classifier to end in nn.Linear")
    return lin


def build_head(train_feats, train_labels, protos: dict, classifier: nn.Linear, *, fusion: str = "textspace",
               use_cache: bool = True, hidden: int = 0, seed: int = 0) -> AlignedHead:
    """Fit the projection on training features against ``protos["prototypes"]`` and fill the cache."""
    proj = fit_projection(np.asarray(train_feats), np.asarray(train_labels), protos["prototypes"], hidden=hidden,
                          seed=seed)
    cache = TipAdapter(train_feats, train_labels, len(CLASS_NAMES)) if use_cache else None
    return make_head(proj, protos, classifier, cache=cache, fusion=fusion)


def make_head(projection: TextProjection, protos: dict, classifier: nn.Linear, *, cache: TipAdapter | None,
              fusion: str = "textspace") -> AlignedHead:
    """Assemble a head from fitted parts (a private copy of the classifier layer)."""
    lin = nn.Linear(classifier.in_features, classifier.out_features)
    lin.load_state_dict(classifier.state_dict())
    texts = {k: protos[k] for k in ("desc_emb", "desc_class", "desc_text", "key")}
    return AlignedHead(projection=projection, prototypes=_t(protos["prototypes"]), classifier=lin.eval().float(),
                       cache=cache, texts=texts, fusion=fusion)
