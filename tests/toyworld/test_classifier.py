"""The shipped ToyWorld classifier reads fresh held-out renders correctly."""

import numpy as np
import torch

from spm_train.toyworld import load_classifier
from spm_train.toyworld.classifier import accuracy
from spm_train.toyworld.render import make_batch, scene_labels


def test_shipped_classifier_accuracy_on_fresh_renders():
    clf = load_classifier("cpu")
    images, _, scenes = make_batch(300, seed=987_654)  # a seed the build never used
    acc = accuracy(clf, images, scene_labels(scenes))
    assert min(acc.values()) >= 0.98, acc


def test_classify_accepts_uint8_and_float_and_gives_features():
    clf = load_classifier("cpu")
    images, _, _ = make_batch(8, seed=5)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    a, b = clf.classify(images), clf.classify(as_float)
    assert set(a) == {"shape", "colour", "style"}
    for name in a:
        assert a[name].shape == (8,) and torch.equal(a[name], b[name])
    feats = clf.features(images)
    assert feats.shape == (8, clf.config.feature_dim) and torch.isfinite(feats).all()
    assert np.allclose(feats.detach().numpy(), clf.features(as_float).detach().numpy(), atol=1e-5)
