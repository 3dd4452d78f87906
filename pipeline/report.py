"""Stage 6, report: ``reports/report.html`` for reviewers and ``reports/model_card.md``.

The HTML is one self-contained, printable file: figures are PNG data URIs, CSS is inline,
there is no script and no external reference, so it opens offline and makes no request.
Every fact is read from a stage output declared in dvc.yaml (gathered by
:mod:`pipeline.reporting.content`), never recomputed or written as fixed text, and laid out by
the autoescaped Jinja2 templates in ``pipeline/reporting/templates/``. Sections follow the
CLAIM 2024 checklist items a pipeline can fill; the model card uses the section names of
Mitchell et al. (2019).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.files import write_text
from pipeline.core.runtime import stage_main
from pipeline.reporting import content

log = logging.getLogger(__name__)


def render(template: str, context: dict) -> str:
    """Render one template of ``pipeline/reporting/templates`` with autoescaping on (HTML and Markdown alike)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.reporting", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(fmt=content.fmt, prefix=lambda text, before: f"{before}{text}",
                       citation_row=lambda citation: ["citation", citation])
    return env.get_template(template).render(context)


def run(params: Params, root: Path = Path("."), out: Path = paths.REPORT_HTML, card: Path = paths.MODEL_CARD) -> Path:
    records = content.load_records(root)
    context = content.context(params, root, records)
    page = render("report.html.j2", context)
    write_text(root / out, page)
    write_text(root / card, render("model_card.md.j2", context))
    log.info("report written to %s (%.0f kB) and %s", root / out, len(page) / 1024, root / card)
    return root / out


def main() -> None:
    stage_main(__doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
