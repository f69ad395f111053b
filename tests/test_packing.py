"""Pack sizing from measured memory: a linear model through two probe iterations."""

from spm_train.architectures import tiny_pipeline
from spm_train.config import TrainerConfig
from spm_train.packing import fit_pack_size, largest_fitting


def test_largest_fitting_pack_from_two_measurements():
    gb = 2**30
    # 23 GB at K=1, 25 GB at K=2: 21 GB shared, 2 GB per concept; 80 GB budget -> 29 concepts
    assert largest_fitting(23 * gb, 25 * gb, 80 * gb, limit=64) == 29
    assert largest_fitting(23 * gb, 25 * gb, 80 * gb, limit=16) == 16
    assert largest_fitting(23 * gb, 25 * gb, 10 * gb, limit=16) == 1  # never below one


def test_no_accelerator_means_no_measurement():
    assert fit_pack_size(tiny_pipeline("sd1"), TrainerConfig.preset("smoke")) is None
