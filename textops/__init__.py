"""The `textops` command: one subcommand per thing a user does with the product (run
the pipeline, deploy, predict over files, promote, retrain, tune, report).

It works inside a checkout of the project, as `git` and `dvc` do: it finds the
directory holding `dvc.yaml` and `conf/` from the current one upwards, and runs that
checkout's code."""
