"""The gallery page (`index.html`) of a generate output, of the fine-tune's samples and of the demo: clips
grouped by kind (and genre), each with its duration and settings, its spectrogram over a time axis in
seconds and an audio player; a clip made from input audio shows beside the input it came from (grouped by
source and slice). One self-contained file: inline CSS, no script, nothing fetched from the network; the
clips' files are linked by their paths relative to the page.

Rows are manifest rows (`outputs.MANIFEST_SCHEMA`); the columns only some kinds have (`genre`, `source`,
`slice`, `strength`, `keep_start`, `keep_end`, `position`, `input_wav`, `input_png`, `copy_of`) may be missing or
null. An input that clips were made from is a row of kind `input` (its own files and seconds) which their
`input_wav` names; it shows at the head of their group rather than in a group of its own. A clip with `copy_of`
(a near-copy of that training slice: audiodiff.memorisation) has a red border and says so on its card.
"""

from __future__ import annotations

import html
import math
from urllib.parse import quote

from audiodiff.ownership import GALLERY_MARK

# CSS px: the shortest clip of a page is MIN_WIDTH wide, and every clip gets as many pixels per second, up to
# MAX_WIDTH (a long continuation is drawn narrower than its seconds); ticks at least MIN_TICK apart
MIN_WIDTH, MAX_WIDTH, MAX_PX_PER_SECOND, MIN_TICK = 240, 1600, 200, 40
TICK_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin:1.2em 0 .2em}h3{font-size:1em;margin:1em 0 .3em;color:#444}
.settings,.legend{color:#555;font-size:.9em;margin:.2em 0 .6em}
.sets{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:0 2em}
.group{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;overflow-x:auto;padding-bottom:.4em}
.input{border-right:3px solid #bbb;padding-right:1em}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em}
figcaption{font-size:.85em;margin-bottom:.3em;max-width:max-content}figcaption b{font-weight:600;display:block}
figcaption span{color:#666}
.spec{width:max-content}
.spec img{display:block;height:160px;image-rendering:pixelated;background:#000;transform:scaleY(-1)}
.axis{position:relative;height:1.4em;border-top:1px solid #888;font-size:11px;color:#444}
.axis span{position:absolute;top:0;border-left:1px solid #888;padding-left:2px;height:.9em;line-height:1.3em}
audio{display:block;width:100%;min-width:200px;margin-top:.3em}
figure.copy{border:3px solid #c62828}.copy-mark{color:#fff;background:#c62828;font-weight:600;font-size:.85em;
padding:.1em .4em;border-radius:3px;margin:0 0 .3em;display:inline-block}
"""


# The PNGs hold the lowest mel band in their first row (as diffusers' Mel writes them); the page flips them so
# that pitch rises upwards, as people read spectrograms.
_LEGEND = ("Each spectrogram shows a clip's mel spectrogram: time left to right, in seconds below it; pitch rising "
           "upwards; brighter is louder. The player under it plays the clip.")


def gallery_html(title: str, rows: list[dict]) -> str:
    """The page of one set of clips."""
    return _page(title, _set(rows, _px_per_second(rows)))


def side_by_side_html(title: str, sets: dict[str, list[dict]]) -> str:
    """Several sets of clips in columns under their headings (e.g. a model before and after fine-tuning, with
    its quality figure), at one scale so that their spectrograms compare."""
    scale = _px_per_second([r for rows in sets.values() for r in rows])
    columns = "".join(f"<section><h2>{html.escape(heading)}</h2>{_set(rows, scale)}</section>"
                      for heading, rows in sets.items())
    return _page(title, f'<div class="sets">{columns}</div>')


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">{GALLERY_MARK}'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n<p class=\"legend\">{_LEGEND}</p>\n{body}\n</body></html>\n")


def _px_per_second(rows: list[dict]) -> float:
    shortest = min((r["seconds"] for r in rows), default=1.0)
    return min(MAX_PX_PER_SECOND, MIN_WIDTH / max(shortest, 1e-3))


def _set(rows: list[dict], scale: float) -> str:
    """Settings every clip shares, once; then the clips by kind and genre, and those made from an input by
    kind and input, the input first."""
    shared = {key: rows[0].get(key) for key in ("model", "scheduler", "steps")
              if rows and len({r.get(key) for r in rows}) == 1}
    settings = " · ".join(filter(None, [
        f"model {shared['model']}" if "model" in shared else "",
        _sampler(shared) if {"scheduler", "steps"} <= shared.keys() else "",
        f"{len(rows)} clip{'s' * (len(rows) != 1)}"]))
    inputs = {r["wav"]: r for r in rows if r["kind"] == "input"}
    shown_beside = {r["input_wav"] for r in rows if r.get("input_wav")}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["wav"] not in shown_beside:
            groups.setdefault((row["kind"], row.get("genre"), row.get("input_wav")), []).append(row)
    parts = [f'<p class="settings">{html.escape(settings)}</p>']
    for (kind, genre, input_wav), members in groups.items():
        heading = " · ".join(filter(None, [f"{kind} clips", f"genre {genre}" if genre else "",
                                           _origin(members[0]) if input_wav else ""]))
        figures = [_input_figure(members[0], inputs.get(input_wav), scale)] if input_wav else []
        figures += [_figure(r, shared, scale) for r in members]
        parts.append(f"<h3>{html.escape(heading)} ({len(members)})</h3>\n"
                     f'<div class="group">{"".join(figures)}</div>')
    return "\n".join(parts)


def _sampler(row: dict) -> str:
    return f"{row['scheduler']} {row['steps']} steps"


def _origin(row: dict) -> str:
    """Where an input came from: its track, and the slice (none: the whole track)."""
    if not row.get("source"):
        return ""
    return f"from {row['source']} · " + ("whole track" if row.get("slice") is None else f"slice {row['slice']}")


def _figure(row: dict, shared: dict, scale: float) -> str:
    if row["kind"] == "input":
        details = [f"{row['seconds']:.2f} s", _origin(row)]
    else:
        details = [f"{row['seconds']:.2f} s", f"seed {row['seed']}"]
        if "scheduler" not in shared or "steps" not in shared:
            details.append(_sampler(row))
        if row.get("strength") is not None:
            details.append(f"strength {row['strength']:g}")
        if row.get("position") is not None:
            details.append(f"position {row['position']:g} from A to B")
        if row.get("keep_start"):
            details.append(f"keeps the first {row['keep_start']:g} s")
        if row.get("keep_end"):
            details.append(f"keeps the last {row['keep_end']:g} s")
        if "model" not in shared:
            details.append(f"model {row['model']}")
    caption = f"<b>{html.escape(row['clip_id'])}</b> <span>{html.escape(' · '.join(filter(None, details)))}</span>"
    if row.get("copy_of"):  # audiodiff.memorisation found it within its threshold of a training slice
        caption = (f'<p class="copy-mark" title="near-copy of the training slice {html.escape(row["copy_of"])}">'
                   f'near-copy of {html.escape(row["copy_of"].rsplit("/", 1)[-1])}</p>' + caption)
    return _clip(caption, row["wav"], row["png"], row["seconds"], scale, row["clip_id"],
                 css_class="copy" if row.get("copy_of") else "")


def _input_figure(output: dict, row: dict | None, scale: float) -> str:
    """The input an output was made from: its own manifest row where the rows hold it (its length gives the time
    axis), else only its files."""
    seconds = row["seconds"] if row else None
    caption = f"<b>input</b> <span>{seconds:.2f} s</span>" if row else "<b>input</b>"
    return _clip(caption, output["input_wav"], output["input_png"], seconds, scale, "the input", css_class="input")


def _clip(caption: str, wav: str, png: str, seconds: float | None, scale: float, name: str,
          css_class: str = "") -> str:
    if seconds is None:
        spectrogram = f'<img src="{_url(png)}" alt="spectrogram of {html.escape(name)}">'
    else:
        width = min(MAX_WIDTH, round(seconds * scale))
        spectrogram = (f'<img src="{_url(png)}" alt="spectrogram of {html.escape(name)}" '
                       f'style="width:{width}px">{_axis(seconds, width)}')
    return (f'<figure class="{css_class}"><figcaption>{caption}</figcaption>'
            f'<div class="spec">{spectrogram}</div>'
            f'<audio controls preload="metadata" src="{_url(wav)}"></audio></figure>')


def _axis(seconds: float, width: int) -> str:
    """Ticks under a spectrogram `width` px wide, every 1, 2, 5, 10, ... seconds, labelled in seconds."""
    step = next((t for t in TICK_SECONDS if t * width / seconds >= MIN_TICK), TICK_SECONDS[-1])
    ticks = [t for t in range(0, math.floor(seconds) + 1, step) if seconds - t > 0.25 * step or t == 0]
    labels = "".join(f'<span style="left:{100 * t / seconds:.2f}%">{t}{" s" if t == 0 else ""}</span>'
                     for t in ticks)
    return f'<div class="axis" title="time in seconds">{labels}</div>'


def _url(path: str) -> str:
    return html.escape(quote(path))
