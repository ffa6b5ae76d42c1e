"""`textops label-queue` and `textops label-import`: the answers most worth a label out
to Label Studio, and its annotations back to the service as feedback."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from textops.project import fail

SERVICE = typer.Option(None, "--service-url", help="the service (default: "
                       "retrain.service_url)")
API_KEY = typer.Option(None, "--api-key", envvar="TEXTOPS_API_KEY",
                       help="the service's API key, when it asks for one")
ADMIN_TOKEN = typer.Option(None, "--admin-token", envvar="TEXTOPS_ADMIN_TOKEN",
                           help="the service's admin token: the queue shows every "
                                "user's texts")


def service_url(given: str | None) -> str:
    if given:
        return given.rstrip("/")
    from pipeline.config import load_params

    return str(load_params().retrain.service_url).rstrip("/")


def headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def label_queue(out: Path = typer.Option(Path("label-tasks.json"), "--out", "-o",
                                         help="the Label Studio tasks file to write"),
                budget: int = typer.Option(100, "--budget", help="how many answers"),
                strategy: str = typer.Option("margin", "--strategy",
                                             help="margin or entropy"),
                url: str = SERVICE, api_key: str = API_KEY,
                admin_token: str = ADMIN_TOKEN) -> None:
    """Write the service's label queue (its least certain unlabelled answers; while a
    challenger runs in shadow mode, those it labelled otherwise first) as Label Studio
    tasks, the model's answer pre-filled, and beside them the labelling configuration
    to create the project with (OUT with .xml).

    Examples:

      textops label-queue --budget 200 -o tasks.json

      textops label-import export.json    # once labelled, send the labels back
    """
    import httpx

    from serving.predlog import label_studio
    from serving.predlog.label_studio import NotLabellable

    base = service_url(url)
    try:
        queue = httpx.get(f"{base}/label-queue", params={"budget": budget,
                          "strategy": strategy}, headers=headers(admin_token), timeout=60)
        meta = httpx.get(f"{base}/metadata", headers=headers(api_key), timeout=30)
    except httpx.HTTPError as err:
        raise fail(f"label-queue: {base}: {err}") from err
    for response in (queue, meta):
        if response.status_code != 200:
            raise fail(f"label-queue: {response.request.url}: {response.status_code} "
                       f"{response.text[:300]}")
    # a classifier's labels; a next-word model has none (its label is the next word)
    labels = meta.json().get("label_names") or None
    images = meta.json().get("task") == "image_classification"
    answered = queue.json()
    items = answered["items"]
    try:
        written = label_studio.tasks(items, labels is not None, images)
    except NotLabellable as err:
        raise fail(f"label-queue: {base}: {err}") from err
    out.write_text(json.dumps(written, indent=1))
    out.with_suffix(".xml").write_text(label_studio.config(labels, images))
    disagreed = sum(1 for item in items if item.get("disagreed"))
    first = (f" ({disagreed} first: the shadow challenger {answered.get('challenger')} "
             "labelled them otherwise)") if disagreed else ""
    typer.echo(f"{len(items)} task(s) in {out}{first}; labelling configuration in "
               f"{out.with_suffix('.xml')}")


def label_import(export: Path = typer.Argument(..., exists=True, dir_okay=False,
                                               help="a Label Studio JSON export"),
                 url: str = SERVICE, api_key: str = API_KEY,
                 chunk: int = typer.Option(64, "--chunk", min=1, help="labels per request"
                                           )) -> None:
    """Send a Label Studio project's annotations of label-queue tasks to the service
    as feedback (POST /feedback, `--chunk` at a time: at most the service's
    TEXTOPS_MAX_TEXTS, 64 by default).

    Examples:

      textops label-import project-1-at-2026-12-06.json
    """
    import httpx

    from serving.predlog.label_studio import ExportError, feedback_items

    try:
        items = feedback_items(json.loads(export.read_text()))
    except (ExportError, json.JSONDecodeError) as err:
        raise fail(f"label-import: {export}: {err}") from err
    base, sent = service_url(url), 0
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        response = httpx.post(f"{base}/feedback", json=part, headers=headers(api_key),
                              timeout=60)
        if response.status_code != 200:
            raise fail(f"label-import: {export}: labels {start}-{start + len(part) - 1}"
                       f" refused ({sent} sent before): {response.status_code} "
                       f"{response.text[:300]}")
        sent += response.json()["accepted"]
    typer.echo(f"{sent} label(s) sent to {base}")


label_queue.cli = {"name": "label-queue"}
label_import.cli = {"name": "label-import"}
COMMANDS = [label_queue, label_import]
