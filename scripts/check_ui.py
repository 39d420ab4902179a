#!/usr/bin/env python
"""Manual check of ``gpt2exp ui``: start the MLflow UI over an output folder's store, open it in headless
Chromium, and save screenshots of what renders: per experiment the runs table, and per parent run its
overview (links to the child runs), its artifacts, its first HTML artifact (the comparison report) and its
first plot (``report/*.png`` first).

Needs Debian's ``chromium`` (``apt-get install --no-install-recommends chromium``) or ``CHROMIUM=/path``.

    python scripts/check_ui.py --output outputs                 # every experiment in outputs/mlflow.db
    python scripts/check_ui.py --output /tmp/uirun --experiment quickstart --shots /tmp/ui-shots

It prints one line per screenshot (PATH: what it shows) and, for each page, whether the run names / the
artifact names were found in the rendered DOM; exit code 1 if any were missing. Look at the PNGs.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from gpt2exp.tracking.browser import dump_dom, find_chromium, screenshot
from gpt2exp.tracking.ui import UIError, mlflow_server


def api(base: str, endpoint: str, body: dict | None = None, /, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def artifact_files(base: str, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run (depth-first)."""
    files = []
    for f in api(base, "artifacts/list", run_id=run_id, **({"path": path} if path else {})).get("files", []):
        files += artifact_files(base, run_id, f["path"]) if f.get("is_dir") else [f["path"]]
    return files


def page_text(dom: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def check(what: str, url: str, expected: list[str], shot: Path) -> bool:
    """Load ``url`` in headless Chromium, look for ``expected`` in its visible text (or raw DOM), screenshot it."""
    dom = dump_dom(url)
    text = page_text(dom)
    missing = [e for e in expected if e not in text and e not in dom]
    screenshot(url, shot)
    print(f"{shot}: {what}\n    {url}")
    print(
        f"    rendered: {', '.join(e for e in expected if e not in missing) or '-'}"
        + (f"; MISSING: {', '.join(missing)}" if missing else "")
    )
    return not missing


def main() -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--output", type=Path, default=Path("outputs"), help="the project's output folder (default: outputs)")
    ap.add_argument("--tracking-uri", help="another store instead of <output>/mlflow.db")
    ap.add_argument("--experiment", action="append", help="experiment name (repeatable; default: all with runs)")
    ap.add_argument("--shots", type=Path, default=Path("ui-shots"), help="folder for the screenshots (default: ui-shots)")
    ap.add_argument("--port", type=int, help="server port (default: a free one)")
    args = ap.parse_args()

    if find_chromium() is None:
        print("error: no chromium: apt-get install --no-install-recommends chromium (or set CHROMIUM)", file=sys.stderr)
        return 2
    uri = args.tracking_uri or f"sqlite:///{args.output.resolve() / 'mlflow.db'}"
    artifacts = None if args.tracking_uri else args.output / "mlartifacts"
    ok = True
    try:
        with mlflow_server(uri, artifacts, port=args.port) as base:
            print(f"MLflow UI at {base} over {uri}")
            experiments = api(base, "experiments/search", {"max_results": 1000})["experiments"]
            if args.experiment:
                unknown = set(args.experiment) - {e["name"] for e in experiments}
                if unknown:
                    print(f"error: no experiment named {', '.join(sorted(unknown))} in {uri}", file=sys.stderr)
                    return 2
                experiments = [e for e in experiments if e["name"] in args.experiment]
            for exp in experiments:
                eid, name = exp["experiment_id"], exp["name"]
                runs = api(base, "runs/search", {"experiment_ids": [eid], "max_results": 1000}).get("runs", [])
                if not runs:
                    continue
                # "Model training" view: a fresh browser profile opens MLflow 3's GenAI view instead
                page = lambda path, eid=eid: f"{base}/#/experiments/{eid}{path}?workflowType=machine_learning"
                tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
                parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
                folder = args.shots / re.sub(r"[^\w.-]+", "_", name)
                ok &= check(
                    f"experiment {name!r}: runs table, {len(parents)} top-level run(s) (child runs collapsed under them)",
                    page("/runs"),
                    [r["info"]["run_name"] for r in parents] + [f"{len(runs)} matching runs"],
                    folder / "runs.png",
                )
                for parent in parents:
                    rid, rname = parent["info"]["run_id"], parent["info"]["run_name"]
                    children = [r["info"]["run_name"] for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == rid]
                    if children:
                        ok &= check(
                            f"run {rname!r}: overview, child runs {', '.join(children)}",
                            page(f"/runs/{rid}"),
                            ["Child runs", *children],
                            folder / f"{rid[:8]}-overview.png",
                        )
                    files = artifact_files(base, rid)
                    tops = sorted({f.split("/")[0] for f in files})
                    ok &= check(
                        f"run {rname!r}: artifacts {', '.join(tops) or 'none'}",
                        page(f"/runs/{rid}/artifacts"),
                        tops,
                        folder / f"{rid[:8]}-artifacts.png",
                    )
                    for page_file in [f for f in files if f.endswith(".html")][:1]:  # shown in a sandboxed iframe
                        ok &= check(
                            f"run {rname!r}: {page_file}",
                            page(f"/runs/{rid}/artifacts/{page_file}"),
                            ['class="mlflow-html-iframe"'],
                            folder / f"{rid[:8]}-{page_file.replace('/', '_')}.png",
                        )
                    pngs = [f for f in files if f.endswith(".png")]
                    if plot := next((f for f in pngs if f.startswith("report/")), pngs[0] if pngs else None):
                        ok &= check(
                            f"run {rname!r}: plot {plot}",
                            page(f"/runs/{rid}/artifacts/{plot}"),
                            [f'<img alt="{plot}" src="blob:'],
                            folder / f"{rid[:8]}-{plot.replace('/', '_')}",
                        )
    except UIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
