"""A small end-to-end run on the real MVTec images in ../shared/data (skipped where absent).

Few images and few epochs keep it to about a minute on two cores; it checks that the routed,
continual pipeline detects real defects, not the full-size benchmark figures (see docs/results.md).
"""

from __future__ import annotations

import pytest

from moleflow.train.bundle import RunBundle

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def test_routed_continual_run_on_real_images(real_run):
    run, _, results = real_run
    # The first task trains the whole flow and is held to a high bar; a later task adapts only
    # its expert, which needs the full data and epochs to reach the figures in docs/results.md (0.985 on
    # transistor): on 53 images and 10 epochs it must still detect clearly above chance.
    bars = {"bottle": 0.95, "transistor": 0.8}
    for name, res in results.items():
        m = res.metrics
        assert m.routing_accuracy == 1.0, name
        assert m.image_auroc >= bars[name], (name, m)
        assert m.pixel_auroc >= bars[name], (name, m)


def test_held_out_images_are_recorded_and_not_trained_on(real_run):
    run, data, _ = real_run
    bundle = RunBundle.open(run)
    for record, proto in zip(bundle.tasks, bundle.load_router().prototypes):
        assert len(record.val_images) == round(0.2 * 66)
        # fitted without them: the training images and each of their random views
        assert record.augment_views == 4
        assert len(proto.train_distances) == 5 * (66 - len(record.val_images))
        assert all((data / record.name / rel).is_file() for rel in record.val_images)
        assert len(set(record.val_images)) == len(record.val_images)
