"""`selective-attention push DIR --repo-id ORG/NAME`: model card + upload of a checkpoint or adapter."""

from __future__ import annotations

import argparse

from selective_attention.gqa import hub


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("push", help="write a model card and upload a checkpoint to the Hugging Face Hub")
    parser.add_argument("directory", help="checkpoint (config.json + safetensors) or PEFT adapter directory")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="write the card and list the files; no network")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / $HF_TOKEN)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan = hub.push_to_hub(args.directory, args.repo_id, private=args.private, dry_run=args.dry_run,
                           token=args.token)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} to {plan.repo_id}{' (private)' if plan.private else ''}:")
    for name in plan.files:
        print(f"  {name}")
    print(f"model card: {plan.card_path}")
    if plan.url:
        print(f"commit: {plan.url}")
    return 0
