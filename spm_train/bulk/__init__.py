"""Bulk training: plan concept x sweep-point jobs in packs, run them on Ray, keep their results.

``plan`` is pure (no Ray), ``store`` is the on-disk result cache and checkpoint area shared by the
driver and every worker, ``runner`` schedules packs on a Ray cluster and collects their results.
"""
