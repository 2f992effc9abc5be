"""A model card as the Hub shows it, for looking at (not collected by pytest: no test_ prefix).

The Hub renders a repository's README.md without its YAML header, as GitHub-flavoured Markdown, with image
links relative to the repository. ``card_html`` does the same with the ``markdown`` package (tables, fenced
code, Markdown inside ``<details>``) and a plain stylesheet; ``screenshot`` shows the page in headless
Chromium. To look at a card by hand:

    python tests/card_html.py RUN_DIR/README.md card.png     # then open card.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STYLE = """
body { font-family: sans-serif; max-width: 900px; margin: 24px auto; line-height: 1.5; color: #111; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f6f6f6; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 13px; }
code { background: #f6f8fa; padding: 1px 3px; }
pre code { padding: 0; }
img { max-width: 100%; }
"""


def chromium() -> str | None:
    """The headless browser's executable, if one is installed."""
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def card_html(card_path: Path) -> str:
    """The card at ``card_path`` as an HTML page, YAML header stripped, images relative to its folder."""
    import markdown

    text = card_path.read_text(encoding="utf-8")
    if text.startswith("---\n"):
        text = text.split("\n---\n", 1)[1]
    # The Hub renders Markdown inside <details>; python-markdown does where the block says markdown="1".
    text = text.replace("<details>", '<details markdown="1" open>')
    body = markdown.markdown(text, extensions=["tables", "fenced_code", "md_in_html"])
    base = card_path.resolve().parent.as_uri() + "/"
    return (f'<!doctype html><html><head><meta charset="utf-8"><base href="{base}">'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def screenshot(html: str, png: Path, width: int = 1000, height: int = 3000) -> Path:
    """``html`` rendered by headless Chromium into ``png`` (``width`` x ``height`` pixels)."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on the PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "card.html"
        page.write_text(html, encoding="utf-8")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--allow-file-access-from-files",
                        f"--user-data-dir={folder}/profile", f"--window-size={width},{height}",
                        f"--screenshot={png.resolve()}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


if __name__ == "__main__":
    card, output = Path(sys.argv[1]), Path(sys.argv[2])
    print(screenshot(card_html(card), output))
