"""Render README.md's Hugging Face Space front matter from spaces.yaml, or check that they agree.

    python -m omni_demo.tools.spaces           # rewrite the front matter
    python -m omni_demo.tools.spaces --check   # exit 1 when README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository


def front_matter(spaces_yaml: Path) -> str:
    metadata = yaml.safe_load(spaces_yaml.read_text())
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n"


def split_readme(text: str) -> tuple[str, str]:
    """(front matter including both '---' lines, the rest); empty front matter if there is none."""
    if text.startswith("---\n"):
        end = text.index("\n---\n", 4) + len("\n---\n")
        return text[:end], text[end:]
    return "", text


def render(readme: Path, spaces_yaml: Path) -> str:
    _, body = split_readme(readme.read_text())
    return front_matter(spaces_yaml) + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--spaces-yaml", type=Path, default=ROOT / "spaces.yaml")
    args = parser.parse_args(argv)
    wanted = render(args.readme, args.spaces_yaml)
    if args.readme.read_text() == wanted:
        return 0
    if args.check:
        print(f"{args.readme} front matter disagrees with {args.spaces_yaml}; run python -m omni_demo.tools.spaces",
              file=sys.stderr)
        return 1
    args.readme.write_text(wanted)
    print(f"updated {args.readme} from {args.spaces_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
