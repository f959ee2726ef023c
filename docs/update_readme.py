"""Rewrites the generated parts of README.md: the method list and the option list, between
their ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers, from the registry and the
option table. Run it after adding a method or an option: ``python docs/update_readme.py``
(tests/test_readme.py fails while README.md is stale)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def generated():
    from l2t_fast import methods
    from l2t_fast.jobs import options

    return {"methods": methods.markdown_table(), "options": options.markdown_table()}


def with_generated(text):
    for name, table in generated().items():
        pattern = re.compile(f"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda match: match.group(1) + table + "\n" + match.group(2), text)
    return text


if __name__ == "__main__":
    README.write_text(with_generated(README.read_text()))
