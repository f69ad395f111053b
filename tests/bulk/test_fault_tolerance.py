"""A node dies mid-training: its pack is retried on another node and resumes from its checkpoint."""

import glob
import threading
import time

import pytest
import ray

from pipelines.bulk_train import train

from .conftest import compose


@pytest.fixture
def two_gpu_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                           "health_check_failure_threshold": 3},
    })
    node_a = cluster.add_node(num_cpus=1, num_gpus=1)
    node_b = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, node_a, node_b
    ray.shutdown()
    cluster.shutdown()


def test_a_pack_on_a_dead_node_resumes_on_the_other(tmp_path, two_gpu_nodes):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster, node_a, node_b = two_gpu_nodes
    cfg = compose(tmp_path, "cluster.gpus_per_job=1", "cluster.max_retries=2", "cluster.pack_size=3",
                  "trainer.iterations=60", "trainer.checkpoint_every=4")

    def remove_node_a_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not glob.glob(str(tmp_path / "store/checkpoints/*/checkpoint.safetensors")):
            time.sleep(0.05)
        cluster.remove_node(node_a, allow_graceful=False)

    killer = threading.Thread(target=remove_node_a_after_first_checkpoint, daemon=True)
    killer.start()
    pin_to_a = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_a.node_id, soft=True)}
    summary = train(cfg, run_dir=str(tmp_path / "run"), task_options=lambda job: pin_to_a)
    killer.join(timeout=5)
    assert [r.status for r in summary.results] == ["trained"] * 3
    assert len({r.concept for r in summary.results}) == 3  # exactly one result per concept
    for r in summary.results:
        assert r.node == node_b.node_id
        assert r.resumed_from > 0 and r.resumed_from % 4 == 0
    assert len(glob.glob(str(tmp_path / "store/results/*/result.json"))) == 3
