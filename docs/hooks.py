"""MkDocs hooks for the fleet's site.

Pages may link to files of the repository outside docs/ (an example's README, a deployment file). MkDocs
cannot serve those, so such a link is written as the file's repository path, linked to the repository when
`repo_url` is set in mkdocs.yml. A link outside docs/ to a file that does not exist is left alone, so the
strict build still reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    here = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(m: re.Match) -> str:
        text, target, fragment = m.group(1), m.group(2), m.group(3) or ""
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)
        inside_docs = posixpath.normpath(posixpath.join(here, target))
        if not inside_docs.startswith("../"):
            return m.group(0)
        in_repo = (docs / inside_docs).resolve()
        try:
            path = in_repo.relative_to(root).as_posix()
        except ValueError:
            return m.group(0)
        if not in_repo.exists():
            return m.group(0)
        if repo_url:
            return f"[{text}]({repo_url}/blob/main/{path}{fragment})"
        return text if path.rstrip("/") in text or path in text else f"{text} (`{path}` in the repository)"

    return LINK.sub(rewrite, markdown)
