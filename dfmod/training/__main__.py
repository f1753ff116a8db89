"""``python -m dfmod.training train|evaluate``: the two commands without the service's CLI.

A training machine may lack the API and worker dependencies that :mod:`dfmod.cli` imports; this entry point
needs only the training stack.
"""

import typer

from dfmod.training.commands import (
    calibrate_command,
    evaluate_command,
    evaluate_faces_command,
    loso_command,
    train_command,
)

app = typer.Typer(help="Train and evaluate the dfmod deepfake detector.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("calibrate")(calibrate_command)
app.command("loso")(loso_command)
app.command("evaluate-faces")(evaluate_faces_command)

if __name__ == "__main__":
    app()
