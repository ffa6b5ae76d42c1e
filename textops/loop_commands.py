"""`textops retrain`: read production, decide, retrain on feedback when a trigger fires."""

from __future__ import annotations

import typer


def retrain(service_url: str = typer.Option(None, "--service-url",
                                            help="the service to read (default: "
                                                 "retrain.service_url)"),
            log: str = typer.Option(None, "--log", help="the prediction log's URL"),
            dry_run: bool = typer.Option(False, "--dry-run", help="decide and record only"),
            force: bool = typer.Option(False, "--force", help="retrain whatever the "
                                       "triggers say")) -> None:
    """Read the service's drift and live quality and the prediction log's feedback; when
    a trigger fires, snapshot the feedback and rerun the pipeline, which promotes the
    new model only if the gate blesses it.

    Examples:

      textops retrain --dry-run

      textops retrain --service-url http://127.0.0.1:8000
    """
    from pipeline.loops.retrain import main

    main([*(["--service-url", service_url] if service_url else []),
          *(["--log", log] if log else []),
          *(["--dry-run"] if dry_run else []), *(["--force"] if force else [])])


COMMANDS = [retrain]
