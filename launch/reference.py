"""The spec reference in docs/spec.md, generated from the schema so the two never drift apart.

python -m launch.reference          # print the Markdown tables
python -m launch.reference --write  # replace them in docs/spec.md (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launch.spec import LinclsSpec, PruneSpec, SlurmConfig, SweepConfig, SweepSpec
from sogclr.contract.config import CheckpointConfig, PretrainConfig, WandbConfig

START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"
SPEC_DOC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", SweepSpec),
    ("slurm", SlurmConfig),
    ("pretrain", PretrainConfig),
    ("pretrain.checkpoint, lincls.checkpoint", CheckpointConfig),
    ("lincls", LinclsSpec),
    ("wandb", WandbConfig),
    ("sweep", SweepConfig),
    ("sweep.prune", PruneSpec),
]


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(arg) for arg in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(annotation))  # launch.spec.X -> X
    text = re.sub(r"Annotated\[(.+?), \w+\(func=<[^>]*>\)\]", r"\1", text)  # validators are not types
    text = re.sub(r"^Optional\[(.+)\]$", r"\1 | None", text)  # as the other optional fields read
    return text.replace("|", "\\|")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default}`"


def reference_markdown() -> str:
    """One table per section: field, type, default, meaning."""
    parts = []
    for title, model in SECTIONS:
        rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |")
        parts.append(f"**{title}**\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def with_reference(document: str) -> str:
    """The document with the text between its two markers replaced by the current reference."""
    head, _, rest = document.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update docs/spec.md in place")
    args = parser.parse_args()
    if args.write:
        SPEC_DOC.write_text(with_reference(SPEC_DOC.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
