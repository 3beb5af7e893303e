"""PNG export of the HTML report's figures (kaleido >= 1, drawing with Chromium)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import plotly.io as pio  # type: ignore[import-untyped]

from pgtrace.errors import PgtraceError, SetupError
from pgtrace.report.figures import Figure

PNG_WIDTH = 1200


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def check_png_export() -> None:
    """kaleido >= 1 importable; it draws with a Chrome/Chromium found on this machine."""
    hint = "pip install 'kaleido>=1' and apt-get install chromium"
    try:
        version = metadata.version("kaleido")
    except metadata.PackageNotFoundError:
        raise SetupError("PNG export needs the kaleido package", hint) from None
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < 1:
        raise SetupError(f"PNG export needs kaleido >= 1, found {version}", hint)
    try:
        import kaleido  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise SetupError(f"PNG export: kaleido cannot be imported ({_one_line(exc)})",
                                hint) from None


def png_names(figures: list[tuple[str, Figure]]) -> list[str]:
    """File names of the figures' PNGs, in page order."""
    return [f"{n:02d}-{slug}.png" for n, (slug, _f) in enumerate(figures, 1)]


def export_png(figures: list[tuple[str, Figure]], png_dir: str) -> list[Path]:
    """Each figure as PNG in png_dir (created); one PgtraceError line when that fails."""
    check_png_export()
    out = Path(png_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PgtraceError(f"cannot create the PNG directory {out}: {exc.strerror}") from None
    paths = [out / name for name in png_names(figures)]
    figs = [f for _slug, f in figures]
    heights = [int(f.layout.height or 500) for f in figs]
    try:
        pio.write_images(figs, paths, format="png", width=PNG_WIDTH, height=heights)
    except Exception as exc:  # kaleido/Chromium fail in many ways; each is one line here
        reason = _one_line(exc)
        if "chrome" in reason.lower() and ("not found" in reason.lower()
                                           or "requires google chrome" in reason.lower()):
            raise SetupError(
                "PNG export needs Chrome or Chromium and kaleido found none",
                "apt-get install chromium",
            ) from None
        raise SetupError(f"PNG export failed: {reason}",
                                "kaleido draws with Chromium: apt-get install chromium") from None
    return paths

