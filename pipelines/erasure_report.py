"""The erasure report: every training/transport variant of a ToyWorld concept set, measured on held-out
phrasings, with the Pareto frontier and the bar.

    python -m pipelines.erasure_report
    python -m pipelines.erasure_report variants=[calibrated,phrasings] bench.samples=2

Writes ``report.html`` (self-contained: tables, the Pareto plot and the pictures inline), ``report.md``,
``report.json``, ``pareto.png``, ``pictures/<concept>.png`` and each variant's membranes under ``out``. The variant closest to the bar is also measured on ToyWorld's variant model
(transfer) and with transport off (ablation). A concept's picture has a row per setting (the base model,
each variant alone, the best with all membranes together and with transport off) and a column per
held-out prompt, each image labelled with the classifier's verdict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines.schema import register
from spm_train.errors import ConfigError, SPMError

logger = logging.getLogger("pipelines.erasure_report")

# what a catalog entry's `concept` may set on every concept of the set (what the erase loss is given)
CONCEPT_OVERRIDES = frozenset({"positive", "neutral", "surrogate", "guidance_scale"})

register()


def check(cfg: DictConfig):
    """Every problem of the config in one ``ConfigError``; returns (concepts, variants, settings), where a
    variant is (trainer, transport, the concepts as it trains them)."""
    from spm_train.config import ConceptSpec, TrainerConfig
    from spm_train.erasure import ErasureSettings
    from spm_train.transport import SCALINGS, SIMILARITIES

    problems = []
    concepts = []
    for raw in OmegaConf.to_container(cfg.concepts.concepts, resolve=True):
        try:
            concepts.append(ConceptSpec(**raw))
        except (ConfigError, TypeError) as exc:
            problems.append(str(exc))
    variants = {}
    catalog = OmegaConf.to_container(cfg.catalog, resolve=True)
    for name in cfg.variants:
        if name not in catalog:
            problems.append(f"variants: {name!r} is not in the catalog ({', '.join(catalog)})")
            continue
        entry = catalog[name] or {}
        unknown = sorted(set(entry) - {"trainer", "transport", "concept"})
        if unknown:
            problems.append(f"catalog.{name}: unknown keys {unknown} (trainer, transport, concept)")
        override = dict(entry.get("concept") or {})
        if set(override) - CONCEPT_OVERRIDES:
            problems.append(f"catalog.{name}.concept: only {', '.join(sorted(CONCEPT_OVERRIDES))}")
            override = {}
        try:
            trained = [dataclasses.replace(c, **override) for c in concepts]
        except ConfigError as exc:
            problems.append(f"catalog.{name}.concept: {exc}")
            trained = concepts
        try:
            trainer = TrainerConfig.preset(cfg.preset, **(entry.get("trainer") or {}))
        except (ConfigError, TypeError) as exc:
            problems.append(f"catalog.{name}.trainer: {exc}")
            continue
        transport = dict(entry.get("transport") or {})
        if transport.get("similarity", "token") not in SIMILARITIES:
            problems.append(f"catalog.{name}.transport.similarity: one of {', '.join(SIMILARITIES)}")
        facilitate = transport.get("facilitate", 1.0)
        if not isinstance(facilitate, (int, float)) or not 0 < facilitate < float("inf"):
            problems.append(f"catalog.{name}.transport.facilitate must be a positive number, got {facilitate!r}")
        if transport.get("scaling", "linear") not in SCALINGS:
            problems.append(f"catalog.{name}.transport.scaling: one of {', '.join(SCALINGS)}")
        if set(transport) - {"similarity", "scaling", "facilitate"}:
            problems.append(f"catalog.{name}.transport: only similarity, scaling and facilitate")
        variants[name] = (trainer, transport, trained)
    if not cfg.variants:
        problems.append("variants is empty")
    try:
        settings = ErasureSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    except TypeError as exc:
        problems.append(f"bench: {exc}")
        settings = None
    if settings is not None:
        for key in ("samples", "fills", "steps", "bootstrap"):
            value = getattr(settings, key)
            if not isinstance(value, int) or value < 1:
                problems.append(f"bench.{key} must be an integer >= 1, got {value!r}")
        if not 0 < settings.draw_threshold <= 1:
            problems.append(f"bench.draw_threshold must be in (0, 1], got {settings.draw_threshold}")
        from spm_train.toyworld.eval_prompts import form_problems, synonym_problems

        problems += [f"bench.{p}" for p in synonym_problems(settings.synonyms)]
        if settings.forms is not None:
            problems += [f"bench.forms: {p}" for p in form_problems(settings.forms)]
    if problems:
        raise ConfigError("erasure report", problems)
    return concepts, variants, settings


def run(cfg: DictConfig) -> dict:
    import torch

    from spm_train import io
    from spm_train.erasure import ErasureBench, summarise
    from spm_train.report import pareto_plot
    from spm_train.toyworld import load_pipeline
    from spm_train.training import train_membranes

    concepts, variants, settings = check(cfg)
    out = str(cfg.out)
    os.makedirs(out, exist_ok=True)
    pipe = load_pipeline("base")
    results, membranes_of, snapshots = {}, {}, {}
    benches, trained_by = {}, {}
    for name, (trainer, transport, trained_concepts) in variants.items():
        fingerprint = (trainer.fingerprint(), json.dumps([_training_fields(c) for c in trained_concepts]))
        stored = _stored(out, name, trained_concepts, trainer)
        if fingerprint in trained_by:
            logger.info("variant %s: the same trainer as %s, its membranes reused", name, trained_by[fingerprint][0])
            trained = trained_by[fingerprint][1]
        elif stored is not None:
            logger.info("variant %s: membranes of the same trainer found in %s, reused", name, out)
            trained = stored
            trained_by[fingerprint] = (name, trained)
        else:
            logger.info("variant %s: training %d membranes", name, len(concepts))
            trained = train_membranes(pipe, trained_concepts, trainer, progress=True).membranes
            trained_by[fingerprint] = (name, trained)
        membranes = {m.name: m for m in trained}
        for m in trained:
            m.save(os.path.join(out, name, f"{m.name}.safetensors"))
        key = _transport_key(transport)
        if key not in benches:
            s = dataclasses.replace(settings, similarity=key[0], scaling=key[1], facilitate=key[2])
            base = benches.get("base_images")
            bench = ErasureBench(pipe, concepts, s) if base is None else base.with_settings(s)
            benches.setdefault("base_images", bench)
            benches[key] = bench
        snapshots[name] = {}
        rows = benches[key].measure(membranes, snapshots=snapshots[name])
        results[name] = {"trainer": trainer.to_dict(), "transport": transport,
                         "concepts": {c.name: _training_fields(c) for c in trained_concepts},
                         "rows": [r.to_dict() for r in rows], "summary": summarise(rows)}
        membranes_of[name] = membranes
        logger.info("variant %s: %s", name, json.dumps(results[name]["summary"]))

    bar = OmegaConf.to_container(cfg.bar, resolve=True)
    best = min(results, key=lambda n: _distance(results[n]["summary"], bar))
    extra = {}
    transport = variants[best][1]
    base_bench = benches[_transport_key(transport)]
    if cfg.transport_off:
        off = base_bench.with_settings(dataclasses.replace(base_bench.settings, transport=False))
        snapshots["transport off"] = {}
        rows = off.measure(membranes_of[best], snapshots=snapshots["transport off"])
        extra["transport_off"] = {"rows": [r.to_dict() for r in rows], "summary": summarise(rows)}
    if cfg.transfer:
        del pipe
        torch.manual_seed(0)
        variant_pipe = load_pipeline("variant")
        transfer = ErasureBench(variant_pipe, concepts, base_bench.settings)
        rows = transfer.measure(membranes_of[best])
        extra["transfer"] = {"rows": [r.to_dict() for r in rows], "summary": summarise(rows)}

    report = {"concepts": [c.name for c in concepts], "settings": dataclasses.asdict(settings), "bar": bar,
              "variants": results, "best": best, "best_extra": extra,
              "command": "python -m pipelines.erasure_report " + " ".join(sys.argv[1:])}
    with io.atomic_output(os.path.join(out, "report.json")) as tmp:
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=2)
    points = {f"{n} ({mode})": (s["mean_nontarget_drop"], s["mean_p_after"])
              for n, r in results.items() for mode, s in r["summary"].items()}
    pareto_plot(points, os.path.join(out, "pareto.png"),
                x_label="mean non-target accuracy drop (points)", y_label="mean P(target) after")
    report["pictures"] = _write_pictures(out, concepts, benches["base_images"], snapshots, best)
    path = _write_report(report, out)
    logger.info("best variant: %s; report: %s", best, path)
    return report


def _write_pictures(out: str, concepts, base_bench, snapshots: dict, best: str) -> dict[str, str]:
    """``pictures/<concept>.png`` for every concept; returns concept -> path relative to ``out``."""
    from spm_train.erasure import write_pictures

    paths = {}
    for c in concepts:
        rows = [("base model (no membrane)", base_bench.snapshot(c.name))]
        rows += [(name, snaps[(c.name, "alone")]) for name, snaps in snapshots.items()
                 if name != "transport off" and (c.name, "alone") in snaps]
        if (c.name, "together") in snapshots[best]:
            rows.append((f"{best}, all membranes together", snapshots[best][(c.name, "together")]))
        if (c.name, "alone") in snapshots.get("transport off", {}):
            rows.append((f"{best}, transport off", snapshots["transport off"][(c.name, "alone")]))
        paths[c.name] = os.path.relpath(write_pictures(os.path.join(out, "pictures", f"{c.name}.png"), c.name, rows),
                                        out)
    return paths


def _stored(out: str, variant: str, concepts, trainer):
    """The variant's membranes from an earlier run into the same ``out`` (a report resumes), when every
    concept's file is there and was trained with this trainer; otherwise None."""
    from spm_train.errors import MembraneFormatError
    from spm_train.membrane import load_membrane

    membranes = []
    for c in concepts:
        path = os.path.join(out, variant, f"{c.name}.safetensors")
        if not os.path.exists(path):
            return None
        try:
            membrane = load_membrane(path)
        except MembraneFormatError:
            return None
        if not _same_training(membrane.trainer, trainer):
            return None
        try:
            recorded = json.loads(membrane.extra.get("concept", "{}"))
        except ValueError:
            return None
        if {k: recorded.get(k) for k in _training_fields(c)} != _training_fields(c):
            return None
        membranes.append(membrane)
    return membranes


def _training_fields(concept) -> dict:
    """The fields of a concept that change what its membrane learns, beside the trainer."""
    return {k: getattr(concept, k) for k in sorted(CONCEPT_OVERRIDES)}


def _same_training(stored: dict, trainer) -> bool:
    """Whether a membrane's recorded trainer trains the same weights as ``trainer``: options added since it
    was written take their defaults, and cadence settings (logging, checkpoints) do not count."""
    from spm_train.config import TrainerConfig

    try:
        return TrainerConfig(**stored).fingerprint() == trainer.fingerprint()
    except (TypeError, ConfigError):
        return False


def _transport_key(transport: dict) -> tuple:
    return (transport.get("similarity", "token"), transport.get("scaling", "linear"),
            float(transport.get("facilitate", 1.0)))


def _distance(summary: dict, bar: dict) -> float:
    """How far a variant is from the bar: the largest excess over any limit (0 when it meets it)."""
    worst = 0.0
    for mode, limits in bar.items():
        if mode not in summary:
            continue
        s = summary[mode]
        worst = max(worst, s["max_p_after"] - limits["max_p_after"],
                    (s["max_nontarget_drop"] - limits["max_nontarget_drop"]) / 100)
    return worst + 1e-3 * sum(s["mean_p_after"] + s["mean_nontarget_drop"] / 100 for s in summary.values())


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


ROW_HEADER = ["concept", "equipped", "drawable", "P before", "P after", "P after 95% CI", "non-target drop (pts)",
              "drop 95% CI", "pixel MSE", "rest of prompt drop (pts)", "γ target", "γ non-target"]


def _rows_table(rows):
    from spm_train.report import Table

    return Table(ROW_HEADER, [
        [r["concept"], r["equipped"], r["drawable"], f"{r['p_before']:.2f}", f"{r['p_after']:.2f}",
         _fmt_ci(r["p_after_ci"]), f"{r['nontarget_drop']:.1f}", _fmt_ci(r["nontarget_drop_ci"]),
         f"{r['pixel_mse']:.2e}", f"{r.get('rest_drop', float('nan')):.1f}", f"{r['gamma_target']:.2f}",
         f"{r['gamma_nontarget']:.2f}"] for r in rows])


def _erased_towards(concepts: dict | None) -> str:
    """What a variant's erase loss pulls its concepts towards, in a few words ("surrogates, g 4")."""
    if not concepts:
        return "–"
    def kind(c: dict) -> str:
        if c.get("surrogate") is not None:
            return "surrogates"
        return "neutral prompts" if c.get("neutral") else "the empty prompt"

    kinds = {kind(c) for c in concepts.values()}
    scales = sorted({float(c.get("guidance_scale", 1.0)) for c in concepts.values()})
    return f"{' and '.join(sorted(kinds))}, g {'/'.join(f'{g:g}' for g in scales)}"


def _write_report(report: dict, out: str) -> str:
    """``report.md`` and a self-contained ``report.html`` (tables from the rows, pictures inline) in ``out``;
    returns the HTML's path."""
    from spm_train.report import Figure, Table, write_report

    bar = report["bar"]
    forms = report["settings"].get("forms")
    where = (f"{len(forms)} sentence forms given in bench.forms" if forms
             else "held-out evaluation templates (spm_train/toyworld/eval_prompts.py)")
    intro = (f"Command: {report['command']}. Prompts: {where}, "
             f"drawable prompts only (base draws the target in >= {report['settings']['draw_threshold']:.0%} of "
             f"{report['settings']['samples']} samples). Bar: alone P after <= {bar['alone']['max_p_after']}, "
             f"non-target drop <= {bar['alone']['max_nontarget_drop']} pts; together "
             f"<= {bar['together']['max_p_after']}, <= {bar['together']['max_nontarget_drop']} pts.")
    summary_rows = []
    for name, r in report["variants"].items():
        towards = _erased_towards(r.get("concepts"))
        for mode, s in r["summary"].items():
            summary_rows.append([name, mode, towards, f"{s['max_p_after']:.2f}", f"{s['mean_p_after']:.2f}",
                                 f"{s['max_nontarget_drop']:.1f}", f"{s['mean_nontarget_drop']:.1f}",
                                 f"{s['mean_pixel_mse']:.2e}", f"{s.get('mean_rest_drop', float('nan')):.1f}"])
    variants = [intro, Table(["variant", "equipped", "erased towards", "max P after", "mean P after",
                              "max non-target drop", "mean non-target drop", "mean pixel MSE",
                              "mean rest-of-prompt drop"], summary_rows)]
    if os.path.exists(os.path.join(out, "pareto.png")):
        variants.append(Figure("Pareto: mean P(target) after against mean non-target drop",
                               os.path.join(out, "pareto.png")))
    sections = [("Variants", variants),
                (f"Best: {report['best']}", _rows_table(report["variants"][report["best"]]["rows"]))]
    for key, title in (("transfer", "On the variant model (transfer)"), ("transport_off", "Transport off")):
        if key in report["best_extra"]:
            sections.append((title, _rows_table(report["best_extra"][key]["rows"])))
    for name, r in report["variants"].items():
        if name != report["best"]:
            sections.append((name, _rows_table(r["rows"])))
    if report.get("pictures"):
        sections.append(("Pictures", [
            "Per concept: a row per setting, a column per held-out prompt (its first target prompts, then "
            "prompts not naming it), two samples each; the classifier's verdict under each image (red frame: "
            "it sees the concept), gamma above each group.",
            *(Figure(concept, os.path.join(out, path)) for concept, path in report["pictures"].items())]))
    _, html_path = write_report(out, f"Erasure report: {', '.join(report['concepts'])}", sections)
    return html_path


@hydra.main(config_path="../conf", config_name="erasure_report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SPMError as exc:
        logger.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
