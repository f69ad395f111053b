"""A pack on two gloo workers (Ray Train TorchTrainer): the workers stay in sync and results are stored once."""

import glob
import json

import ray
import torch

from pipelines.bulk_train import train
from spm_train import load_membrane

from .conftest import compose


def test_two_workers_train_one_pack_data_parallel(tmp_path, ray_shutdown):
    cfg = compose(tmp_path, "cluster.num_cpus=3", "cluster.workers_per_job=2", "cluster.pack_size=3",
                  "trainer.iterations=4", "trainer.checkpoint_every=2")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    assert [r.status for r in summary.results] == ["trained"] * 3, [r.error for r in summary.results]
    assert len(glob.glob(str(tmp_path / "store/results/*/result.json"))) == 3
    ray.shutdown()
    # the same pack on one worker sees half the trajectories, so its membranes differ
    single = train(compose(tmp_path / "single", "cluster.num_cpus=2", "cluster.pack_size=3",
                           "trainer.iterations=4"), run_dir=str(tmp_path / "run1"))
    for a, b in zip(summary.results, single.results):
        ma, mb = load_membrane(a.membrane), load_membrane(b.membrane)
        assert ma.name == mb.name
        diff = max((ma.weights[k][1] - mb.weights[k][1]).abs().max().item() for k in ma.weights)
        assert diff > 1e-6


def test_gradients_are_averaged_over_ranks(tmp_path):
    """Two gloo ranks started as torchrun would: accelerate reads the ranks from the environment, averages
    the gradients, and both ranks hold identical membranes, which moved; each rank logs the same losses."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    m0, m1 = load_membrane(tmp_path / "rank0.safetensors"), load_membrane(tmp_path / "rank1.safetensors")
    for key in m0.weights:
        assert torch.equal(m0.weights[key][0], m1.weights[key][0])
        assert torch.equal(m0.weights[key][1], m1.weights[key][1])
    assert max(m0.weights[k][1].abs().max().item() for k in m0.weights) > 0
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0]["world"] == losses[1]["world"] == 2 and losses[0]["losses"] == losses[1]["losses"]


def _rank_main(rank, world, out):
    import os

    import torch.distributed as dist

    from spm_train import ConceptSpec, TrainerConfig, train_membranes
    from spm_train.architectures import tiny_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pipe = tiny_pipeline("sd1")
        cfg = TrainerConfig.preset("smoke", iterations=3, lr=1e-2)
        result = train_membranes(pipe, [ConceptSpec("cat", "a photo of a cat")], cfg, progress=False)
        result.membranes[0].save(f"{out}/rank{rank}.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump({"world": dist.get_world_size(),
                       "losses": [r["loss"] for r in result.history]}, fh)
    finally:
        dist.destroy_process_group()
