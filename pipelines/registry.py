"""Command line of the membrane registry.

    python -m pipelines.registry list [--json]
    python -m pipelines.registry show snoopy@production           # or snoopy:v3, or snoopy (latest)
    python -m pipelines.registry promote snoopy:v3 production [--force --reason "..."]
    python -m pipelines.registry unalias snoopy candidate          # take an alias off a concept
    python -m pipelines.registry verify                           # re-hash every blob, check the index
    python -m pipelines.registry export bundle/ [snoopy:v3 ...]   # manifest, files, model cards
    python -m pipelines.registry import bundle/
    python -m pipelines.registry import snoopy_last.safetensors --concept snoopy   # one file (also official SPM)
    python -m pipelines.registry gc [--dry-run]
    python -m pipelines.registry wandb-aliases                     # W&B artifacts get the registry's aliases

``promote`` and ``unalias`` carry the change to the version's W&B artifact when the version was logged
to W&B: online through W&B's API, offline as a small offline run for ``wandb sync`` (``--wandb`` chooses;
``WANDB_MODE=disabled`` turns it off). ``wandb-aliases`` (online) sets every logged artifact's aliases
from the registry, e.g. after offline changes were synced.

The registry is ``--root`` or ``$SPM_HOME/registry`` (``runs/registry`` without SPM_HOME). Errors are
one line on stderr and exit code 2; ``verify`` and ``show`` exit 1 when they find a problem with a blob,
``import`` when a version it registered failed validation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sqlite3
import sys

from spm_train.errors import SPMError
from spm_train.config import valid_name
from spm_train.registry import FAILED, Registry, export_bundle, import_bundle, import_file

logger = logging.getLogger("pipelines.registry")


def default_root() -> str:
    return os.path.join(os.environ.get("SPM_HOME", "runs"), "registry")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.registry", description="the membrane registry")
    p.add_argument("--root", default=None, help="registry folder (default: $SPM_HOME/registry)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every version, with status and aliases")
    ls.add_argument("concept", nargs="?", help="only this concept")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = sub.add_parser("show", help="one version in full: CONCEPT, CONCEPT:vN or CONCEPT@ALIAS")
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")
    pr = sub.add_parser("promote", help="point an alias at a version")
    pr.add_argument("ref")
    pr.add_argument("alias")
    pr.add_argument("--force", action="store_true", help="promote a version that did not pass validation")
    pr.add_argument("--reason", default="", help="recorded with the promotion")
    un = sub.add_parser("unalias", help="take an alias off a concept")
    un.add_argument("concept")
    un.add_argument("alias")
    for command in (pr, un):
        command.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                             help="carry the change to the W&B artifact: auto (the way the version was "
                                  "logged), online, offline (a run for `wandb sync`) or off")
        command.add_argument("--wandb-dir", default=None,
                             help="where offline runs go (default: the registry's parent folder, beside "
                                  "the bulk runs' wandb/)")
    wa = sub.add_parser("wandb-aliases", help="give every W&B membrane artifact the registry's aliases (online)")
    wa.add_argument("concept", nargs="?", help="only this concept")
    sub.add_parser("verify", help="re-hash every blob and check the index")
    ex = sub.add_parser("export", help="write a bundle: manifest.json, membranes, model cards")
    ex.add_argument("dir")
    ex.add_argument("refs", nargs="*", help="versions to export (default: all)")
    im = sub.add_parser("import", help="register a bundle's versions after checking their hashes, or one file")
    im.add_argument("dir", help="a bundle folder, or one .safetensors membrane (ours or the official SPM code's)")
    im.add_argument("--concept", default=None, help="concept to register a single file as (default: its name)")
    gc = sub.add_parser("gc", help="remove blobs no version points to")
    gc.add_argument("--dry-run", action="store_true")
    return p


def _open(args, create: bool = False) -> Registry:
    return Registry.open(args.root or default_root(), create=create)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_list(args) -> int:
    with _open(args) as reg:
        versions = reg.versions(args.concept)
        forced = {(a["concept"], a["alias"]) for a in reg.index.aliases(args.concept) if a["forced"]}
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=1, sort_keys=True, default=str))
        return 0
    header = ["version", "status", "aliases", "sha256", "erasure", "target drop", "created"]
    metric = lambda v, key: "-" if key not in v.metrics else f"{v.metrics[key]:.3f}"  # noqa: E731
    rows = [[v.ref, v.status, ",".join(a + ("(forced)" if (v.concept, a) in forced else "") for a in v.aliases), v.sha256[:12],
             metric(v, "erasure_rate"), metric(v, "target_drop"), _when(v.created)]
            for v in versions]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return 0


def cmd_show(args) -> int:
    with _open(args) as reg:
        v = reg.resolve(args.ref)
        events = [e for e in reg.index.events(v.concept) if e["version"] == v.version]
        blob = reg.blob_problem(v)
    code = 1 if blob else 0
    if args.json:
        print(json.dumps({**v.to_dict(), "events": events, "blob": blob or "intact"}, indent=1, sort_keys=True,
                         default=str))
        return code
    print(f"{v.ref}  ({v.status})  aliases: {', '.join(v.aliases) or '-'}")
    print(f"  sha256:   {v.sha256}  ({v.size} bytes, {_when(v.created)} UTC)")
    print(f"  blob:     {'PROBLEM: ' + blob if blob else 'intact (re-hashed)'}")
    print(f"  erases:   {v.metadata.get('concepts', '?')}  family {v.metadata.get('family', '?')}, "
          f"rank {v.metadata.get('rank', '?')}, alpha {v.metadata.get('alpha', '?')}")
    print(f"  validation: structural {v.validation.get('structural')}, behavioural {v.validation.get('behavioural')}")
    for reason in v.validation.get("reasons", []):
        print(f"    - {reason}")
    for key, value in sorted(v.metrics.items()):
        print(f"  metric {key}: {value:.4g}" if isinstance(value, (int, float)) else f"  metric {key}: {value}")
    for key, value in sorted(v.lineage.items()):
        print(f"  lineage {key}: {json.dumps(value, default=str)}")
    for e in events:
        print(f"  {_when(e['ts'])}  {e['action']}  {json.dumps(e['detail'], sort_keys=True, default=str)}")
    return code


def cmd_promote(args) -> int:
    with _open(args) as reg:
        v = reg.promote(args.ref, args.alias, force=args.force, reason=args.reason)
    forced = args.force and v.status != "passed"
    print(f"{v.concept}@{args.alias} -> {v.ref}" + (" (forced)" if forced else ""))
    _mirror(args, v, {"action": "promote", "concept": v.concept, "alias": args.alias, "version": v.version,
                      "sha256": v.sha256, "status": v.status, "forced": forced, "reason": args.reason})
    return 0


def cmd_unalias(args) -> int:
    with _open(args) as reg:
        v = reg.resolve(f"{args.concept}@{args.alias}")  # the version losing it (an unknown alias fails here)
        reg.remove_alias(args.concept, args.alias)
    print(f"removed {args.concept}@{args.alias}")
    _mirror(args, v, {"action": "unalias", "concept": v.concept, "alias": args.alias, "version": v.version,
                      "sha256": v.sha256})
    return 0


def _mirror(args, version, change: dict) -> None:
    """The alias change, carried to the version's W&B artifact. The registry has changed whatever happens
    here (it is the source of truth): a failure is a warning, and `wandb-aliases` can catch up later."""
    from spm_train.tracking import mirror_alias

    lineage = version.lineage
    mode = (lineage.get("wandb_mode") or "offline") if args.wandb == "auto" else args.wandb
    if args.wandb == "off" or os.environ.get("WANDB_MODE", "").lower() == "disabled" \
            or not lineage.get("wandb_run_id"):  # never logged to W&B: there is no artifact to change
        return
    directory = args.wandb_dir or os.path.dirname(os.path.abspath(args.root or default_root()))
    try:
        print(mirror_alias({**change, "ref": version.ref}, mode=mode, directory=directory,
                           project=lineage.get("wandb_project") or "spm-membranes",
                           entity=lineage.get("wandb_entity")))
    except Exception as exc:  # noqa: BLE001 - W&B raises its own types; the registry change stands
        print(f"warning: the registry changed, W&B did not ({exc}); "
              "`python -m pipelines.registry wandb-aliases` brings W&B in line later", file=sys.stderr)


def cmd_wandb_aliases(args) -> int:
    from spm_train.tracking import sync_aliases

    with _open(args) as reg:
        logged = [v for v in reg.versions(args.concept) if v.lineage.get("wandb_run_id")]
    by_project: dict[tuple, list] = {}
    for v in logged:
        by_project.setdefault((v.lineage.get("wandb_project") or "spm-membranes", v.lineage.get("wandb_entity")),
                              []).append(v)
    for (project, entity), versions in sorted(by_project.items(), key=str):
        try:
            lines = sync_aliases(versions, project=project, entity=entity)
        except Exception as exc:  # noqa: BLE001 - no key, no server: W&B raises its own types
            raise SPMError(f"W&B project {project}: {exc}") from None
        for line in lines:
            print(line)
    print(f"{len(logged)} version(s) logged to W&B checked")
    return 0


def cmd_verify(args) -> int:
    with _open(args) as reg:
        problems = reg.verify()
        n = len(reg.versions())
        orphans = len(reg.gc(dry_run=True))
    for p in problems:
        print(p)
    print(f"{n} version(s) checked, {len(problems)} problem(s)"
          + (f"; {orphans} unreferenced file(s), `gc` removes them" if orphans else ""))
    return 1 if problems else 0


def cmd_export(args) -> int:
    with _open(args) as reg:
        manifest = export_bundle(reg, args.dir, args.refs or None)
    print(manifest)
    return 0


def cmd_import(args) -> int:
    single = os.path.isfile(args.dir)
    concept = args.concept or (os.path.splitext(os.path.basename(args.dir))[0] if single else None)
    if single and not valid_name(concept):
        raise SPMError(f"{concept!r} is not a concept name; name the concept with --concept NAME")
    if args.concept and not single:
        raise SPMError("--concept applies to importing one file; a bundle names its concepts")
    with _open(args, create=True) as reg:
        versions = [import_file(reg, args.dir, concept)] if single else import_bundle(reg, args.dir)
    for v in versions:
        print(f"{v.ref}  {'new' if v.new else 'already present'}  {v.status}  {v.sha256[:12]}")
    failed = [v for v in versions if v.status == FAILED]
    if failed:
        print(f"{len(failed)} version(s) failed validation: {', '.join(v.ref for v in failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_gc(args) -> int:
    with _open(args) as reg:
        removed = reg.gc(dry_run=args.dry_run)
    for path in removed:
        print(("would remove " if args.dry_run else "removed ") + path)
    print(f"{len(removed)} unreferenced file(s)")
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "promote": cmd_promote, "unalias": cmd_unalias, "verify": cmd_verify,
            "export": cmd_export, "import": cmd_import, "gc": cmd_gc, "wandb-aliases": cmd_wandb_aliases}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (SPMError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"error: the registry index cannot be read ({exc}); restore it from a backup or re-import "
              "an exported bundle", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
