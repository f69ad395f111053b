"""Object-store URLs for the result store and the registry's blobs are checked when the config is
validated: an unknown protocol, or one whose filesystem package is missing, is one message naming what
to install, before the base model loads."""

import sys

import pytest

from spm_train.errors import ConfigError

from .conftest import compose


@pytest.fixture
def no_s3fs(monkeypatch):
    """s3fs and gcsfs absent, whether or not this machine has them: their imports fail and fsspec has no
    class of theirs cached."""
    cached = sys.modules["fsspec.registry"]._registry  # `fsspec.registry` itself is a read-only view of it
    for package, protocols in (("s3fs", ("s3", "s3a")), ("gcsfs", ("gs", "gcs"))):
        monkeypatch.setitem(sys.modules, package, None)
        for protocol in protocols:
            monkeypatch.delitem(cached, protocol, raising=False)


def test_a_store_whose_filesystem_is_missing_is_refused_before_the_model_loads(tmp_path, monkeypatch, no_s3fs):
    import pipelines.bulk_train as bulk_train

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model loaded before the config was refused")

    monkeypatch.setattr(bulk_train, "_setup_model", must_not_load)
    cfg = compose(tmp_path, "paths.store=s3://bucket/spm/store", "registry.blobs=nosuch://bucket/blobs")
    with pytest.raises(ConfigError) as info:
        bulk_train.plan_run(cfg)
    message = str(info.value)
    assert "paths.store=s3://bucket/spm/store: the s3:// filesystem is not installed here: " \
           "pip install 'spm-train[s3]'" in message
    assert "registry.blobs=nosuch://bucket/blobs: fsspec knows no filesystem for nosuch:// URLs" in message


def test_the_blobs_of_a_chained_url_name_their_extra(no_s3fs):
    from spm_train.io import filesystem_problem

    assert filesystem_problem("simplecache::s3://bucket/blobs").endswith("pip install 'spm-train[s3]'")
    assert filesystem_problem("gs://bucket/blobs").endswith("pip install 'spm-train[gcs]'")
    assert filesystem_problem("memory://blobs") is None and filesystem_problem("relative/blobs") is None


def test_an_in_memory_store_and_blobs_pass_the_check(tmp_path):
    from pipelines.bulk_train import _check_stages

    cfg = compose(tmp_path, "paths.store=memory://spm-test/store", "registry.blobs=memory://spm-test/blobs")
    assert _check_stages(cfg, []) == []
    cfg = compose(tmp_path, "paths.store=memory://spm-test/store", "registry.blobs=memory://spm-test/blobs",
                  "registry.enabled=false")
    assert _check_stages(cfg, []) == []
