"""ctune's page in the Airflow UI: a FastAPI app the plugin mounts at ``/ctune`` in the API server.

It shows the workspace's versions (metrics, which is current), each day's selection funnel and the gate's scores
over time (as small server-drawn SVG charts: no scripts to load, nothing to download), the compute saved so far,
and a rollback button per version that triggers the ``ctune_rollback`` DAG through Airflow's own REST API with the
user's token. Every route requires Airflow's authentication (:data:`GetUserDep`, the dependency Airflow's API
uses: a bearer token or the UI's session cookie); an anonymous request gets 401.

The workspace is the ``CTUNE_WORKSPACE`` environment variable of the API server (the components of one deployment
share it; ``ctune_ops.airflow.local`` and ``docker-compose.yml`` set it). Everything is read from the workspace's
files on each request: ``registry.json``, ``CURRENT``, ``reports/D/*.json``.
"""

from __future__ import annotations

import html
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

ROLLBACK_DAG = "ctune_rollback"
CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 640, 160, 28
REPORT_NAMES = ("validation.json", "dedup.json", "selection.json", "train.json", "proxy.json", "eval.json",
                "repair.json")
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1a202c}h1{font-size:1.4rem}h2{font-size:1.1rem;
margin-top:1.6rem}table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #cbd5e0;padding:.25rem .5rem;
text-align:right}th{background:#edf2f7}td.l,th.l{text-align:left}tr.current{background:#e6fffa;font-weight:600}
.kpi{display:inline-block;margin-right:2rem}.kpi b{font-size:1.3rem;display:block}button{font-size:.8rem}
"""


def _user_dependency() -> Any:
    """Airflow's authenticated-user dependency (imported when the app is built: it needs Airflow's API package)."""
    from airflow.api_fastapi.core_api.security import get_user

    return Depends(get_user)


def _workspace() -> Any:
    from ctune_ops.airflow.dags import workspace_path
    from ctune_ops.workspace import Workspace, WorkspaceError

    try:
        return Workspace.open(workspace_path())
    except WorkspaceError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None


def _deciding_report(ws: Any, day: str) -> dict[str, Any]:
    """The gate report that decided the day (the repaired candidate's when the repair stage ran); a repair
    report left stale by a rerun of evaluate shows the first gate's, as promote would refuse it."""
    from ctune_ops.stages import StageError
    from ctune_ops.stages.repair import deciding_report

    try:
        return deciding_report(ws, day)
    except StageError:
        return ws.report(day, "eval.json")


def _days(ws: Any) -> list[dict[str, Any]]:
    """Per day: funnel, tokens, the gate's scores and the outcome, from the day's reports and the registry."""
    from ctune_ops.registry import Registry

    registry = Registry.load(ws)
    days = []
    folder = ws.root / "reports"
    dates = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    for day in dates:
        selection = ws.report(day, "selection.json")
        if not selection:
            continue
        validation, evaluation = ws.report(day, "validation.json"), _deciding_report(ws, day)
        outcome = registry.day_outcome(day)
        days.append({
            "date": day,
            "raw": validation.get("raw"),
            "quarantined": validation.get("quarantined"),
            **selection["funnel"],
            "selected_tokens": selection["selected_tokens"],
            "unique_tokens": selection["unique_tokens"],
            "scores": {c["task"]: c["candidate"] for c in evaluation.get("checks", [])},
            "production_scores": {c["task"]: c["production"] for c in evaluation.get("checks", [])},
            "decision": evaluation.get("decision"),
            "repaired": bool(ws.report(day, "repair.json").get("attempted")),
            "outcome": None if outcome is None else f"{outcome['kind']} {outcome['version']}",
        })
    return days


def _svg_chart(series: dict[str, list[tuple[str, float]]], title: str) -> str:
    """A small line chart: one polyline per series, dates along x, values 0..1 along y."""
    dates = sorted({d for points in series.values() for d, _ in points})
    if not dates:
        return ""
    colours = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")
    x_step = (CHART_WIDTH - 2 * CHART_PAD) / max(len(dates) - 1, 1)

    def xy(date: str, value: float) -> str:
        x = CHART_PAD + dates.index(date) * x_step
        y = CHART_HEIGHT - CHART_PAD - value * (CHART_HEIGHT - 2 * CHART_PAD)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}">',
             f'<text x="{CHART_PAD}" y="14" font-size="12">{html.escape(title)}</text>']
    for k, (name, points) in enumerate(sorted(series.items())):
        colour = colours[k % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{" ".join(xy(d, v) for d, v in points)}"/>')
        parts.append(f'<text x="{CHART_WIDTH - 200}" y="{16 + 14 * k}" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    for date in dates:
        parts.append(f'<text x="{xy(date, 0).split(",")[0]}" y="{CHART_HEIGHT - 8}" font-size="9" '
                     f'text-anchor="middle">{date[5:]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _compute_saved(days: list[dict[str, Any]]) -> dict[str, Any]:
    selected = sum(d["selected_tokens"] for d in days)
    unique = sum(d["unique_tokens"] for d in days)
    return {"selected_tokens": selected, "unique_tokens": unique,
            "saved_share": None if not unique else round(1 - selected / unique, 4)}


def _page(ws: Any, message: str = "") -> str:
    from ctune_ops.registry import versions_table

    versions, days = versions_table(ws), _days(ws)
    saved = _compute_saved(days)
    tasks = sorted({t for row in versions for t in row["metrics"]})
    rows = []
    for row in versions:
        metrics = "".join(f"<td>{'-' if row['metrics'].get(t) is None else format(row['metrics'][t], '.3f')}</td>"
                          for t in tasks)
        action = "" if row["current"] or row["version"] == "v0" else (
            f'<form method="post" action="rollback"><input type="hidden" name="version" value="{row["version"]}">'
            f'<button type="submit">roll back to {row["version"]}</button></form>')
        rows.append(f'<tr class="{"current" if row["current"] else ""}" data-version="{row["version"]}">'
                    f'<td class="l">{row["version"]}{" (current)" if row["current"] else ""}</td>'
                    f'<td class="l">{row["date"] or "-"}</td><td class="l">{row["parent"] or "-"}</td>'
                    f"<td>{row['training_rows'] if row['training_rows'] is not None else '-'}</td>{metrics}"
                    f"<td class='l'>{action}</td></tr>")
    funnel_cols = ("raw", "quarantined", "exact_duplicate", "near_duplicate", "known", "misaligned", "selected",
                   "replay", "selected_tokens", "unique_tokens")
    funnel = "".join(
        f'<tr><td class="l"><a href="days/{d["date"]}">{d["date"]}</a></td>'
        + "".join(f"<td>{'-' if d.get(c) is None else d[c]}</td>" for c in funnel_cols)
        + f'<td class="l">{d["decision"] or "-"}{" (repaired)" if d["repaired"] else ""}</td>'
        + f'<td class="l">{d["outcome"] or "-"}</td></tr>' for d in days)
    score_tasks = sorted({t for d in days for t in d["scores"]})
    trend = _svg_chart({f"{t} (candidate)": [(d["date"], d["scores"][t]) for d in days if t in d["scores"]]
                        for t in score_tasks}, "gate metric per day (candidate)")
    share = _svg_chart({"selected / unique tokens": [(d["date"], d["selected_tokens"] / max(d["unique_tokens"], 1))
                                                      for d in days]}, "share of tokens trained per day")
    saved_text = "-" if saved["saved_share"] is None else f"{saved['saved_share']:.0%}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ctune</title><style>{STYLE}</style></head>
<body><h1>ctune: {html.escape(str(ws.root))}</h1>
{f'<p class="message">{html.escape(message)}</p>' if message else ''}
<div><span class="kpi"><b id="current-version">{html.escape(ws.current_version)}</b>current version</span>
<span class="kpi"><b>{len(versions) - 1}</b>versions promoted</span>
<span class="kpi"><b id="compute-saved">{saved_text}</b>tokens not trained ({saved['selected_tokens']} of
{saved['unique_tokens']} unique tokens selected)</span></div>
<h2>Versions</h2><table id="versions"><tr><th class="l">version</th><th class="l">date</th><th class="l">parent</th>
<th>rows</th>{''.join(f'<th>{html.escape(t)}</th>' for t in tasks)}<th class="l">rollback</th></tr>{''.join(rows)}
</table>
<h2>Selection funnel per day</h2><table id="funnel"><tr><th class="l">date</th>
{''.join(f'<th>{c}</th>' for c in funnel_cols)}<th class="l">gate</th><th class="l">outcome</th></tr>{funnel}</table>
<h2>Trends</h2>{trend}<br>{share}
</body></html>"""


def _trigger_rollback(request: Request, version: str) -> str:
    """POST a ``ctune_rollback`` run through Airflow's REST API as the requesting user; returns its run id."""
    token = request.cookies.get("_token") or request.headers.get("authorization", "").removeprefix("Bearer ")
    base = str(request.base_url).rstrip("/")
    body = json.dumps({"logical_date": None, "conf": {"version": version}}).encode()
    call = urllib.request.Request(f"{base}/api/v2/dags/{ROLLBACK_DAG}/dagRuns", data=body, method="POST",
                                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(call, timeout=30) as response:  # noqa: S310 - the API server itself
            return json.load(response)["dag_run_id"]
    except urllib.error.HTTPError as exc:
        detail = f"Airflow refused the rollback run: {exc.read()[:500]!r}"
        raise HTTPException(status_code=exc.code, detail=detail) from None


def create_app() -> FastAPI:
    """The app the plugin mounts (see :mod:`ctune_ops.airflow.plugin`)."""
    app = FastAPI(title="ctune", description="Versions, selection funnels and rollback of a ctune workspace")
    user = _user_dependency()

    @app.get("/", response_class=HTMLResponse, dependencies=[user])
    def index(message: str = "") -> str:
        return _page(_workspace(), message)

    @app.get("/api/versions", dependencies=[user])
    def versions() -> dict[str, Any]:
        from ctune_ops.registry import versions_table

        ws = _workspace()
        return {"current": ws.current_version, "versions": versions_table(ws)}

    @app.get("/api/days", dependencies=[user])
    def days() -> dict[str, Any]:
        found = _days(_workspace())
        return {"days": found, "compute": _compute_saved(found)}

    @app.get("/days/{date}", response_class=HTMLResponse, dependencies=[user])
    def day(date: str) -> str:
        from ctune_ops.stages import StageError, check_date

        try:
            check_date(date)
        except StageError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        folder = Path(_workspace().root) / "reports" / date
        if not folder.is_dir():
            raise HTTPException(status_code=404, detail=f"no reports for {date}")
        sections = "".join(
            f"<h2>{name}</h2><pre>{html.escape((folder / name).read_text(encoding='utf-8'))}</pre>"
            for name in REPORT_NAMES if (folder / name).exists())
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>ctune {date}</title><style>{STYLE}</style>"
                f"</head><body><h1>ctune {date}</h1><p><a href='../'>all days</a></p>{sections}</body></html>")

    @app.post("/rollback", dependencies=[user])
    def rollback(request: Request, version: str = Form(...)) -> RedirectResponse:
        from ctune_ops.registry import Registry

        if Registry.load(_workspace()).version(version) is None:
            raise HTTPException(status_code=404, detail=f"no version {version!r}")
        run_id = _trigger_rollback(request, version)
        return RedirectResponse(f"./?message=rollback to {version} triggered: {ROLLBACK_DAG} run {run_id}",
                                status_code=303)

    return app
