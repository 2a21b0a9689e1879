"""``tipcap push``: publish a model folder to the Hugging Face hub."""

from __future__ import annotations

import click


@click.command("push")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model folder.")
@click.option("--repo", required=True, help="Hub model name to publish to, owner/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the hub repository as private.")
@click.option("--token", default=None, help="Hugging Face token (default: HF_TOKEN, else `hf auth login`'s).")
@click.option("--message", default=None, help="Commit message.")
def push_command(model_dir: str, repo: str, private: bool, token: str | None, message: str | None) -> None:
    """Publish a model folder, with its model card, to the Hugging Face hub."""
    from tipcap.hub import push_model

    url = push_model(model_dir, repo, private=private, token=token, commit_message=message)
    click.echo(f"pushed {model_dir} to {repo}: {url}")
